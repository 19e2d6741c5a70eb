"""How long decomposing a whole torchvision model takes (Tucker-2 for Conv2d, SVD for Linear, keep=0.5), with
parameters and multiply-adds before and after; CP's time alongside, as a multiple of Tucker's (the goal: ≤ 10×).
Run: python bench/decompose_time.py [--cp]"""
import argparse, time, torch, torchvision
from torch.utils.flop_counter import FlopCounterMode
from fasterai_lr.all import *

def macs(model, x):
    with FlopCounterMode(display=False) as fc: model(x)
    return fc.get_total_flops()//2

def timed(f):
    t = time.perf_counter(); r = f(); return r, time.perf_counter()-t

if __name__=='__main__':
    p = argparse.ArgumentParser(); p.add_argument('--cp', action='store_true', help='also time CP'); p.add_argument('--models', default='resnet18,resnet50,vgg16_bn,mobilenet_v2')
    a = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    targets = dict(resnet18=2, resnet50=2, vgg16_bn=5, mobilenet_v2=1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':14}{'method':8}{'time s':>8}{'target':>8}{'params':>13}{'params after':>14}{'MACs':>16}{'MACs after':>16}{'layers':>9}{'× tucker':>10}")
    decompose_model(torchvision.models.resnet18(weights=None), 'tucker', keep=0.5, quiet=True)   # a warm process: first-call setup of the BLAS/LAPACK kernels
    with torch.no_grad():
        for name in a.models.split(','):
            m = getattr(torchvision.models, name)(weights=None).eval()
            p0, m0 = sum(p.numel() for p in m.parameters()), macs(m, x)
            t = {}
            for meth in ['tucker'] + (['cp'] if a.cp else []):
                (new, rep), t[meth] = timed(lambda: decompose_model(m, meth, keep=0.5, quiet=True))
                print(f"{name:14}{meth:8}{t[meth]:8.2f}{targets[name] if meth=='tucker' else targets[name]*10:8}{p0:13,}{sum(p.numel() for p in new.parameters()):14,}"
                      f"{m0:16,}{macs(new, x):16,}{f'{rep.method.notna().sum()}/{len(rep)}':>9}{t[meth]/t['tucker']:10.1f}", flush=True)
