"""The composed path on a trained model: one budget, one calibration, one call, then fine-tuning.

A VGG-style CNN (1.42M parameters) is trained here on scikit-learn's digits, upsampled to 16×16. Every conv with k>1
(but the first, which has one input channel) and every hidden Linear are compressed to 25% and to 10% of their
parameters, the output layer kept. For each way of doing it, the relative error of the test logits against the dense
model and the test accuracy, before and after one epoch of fine-tuning (Adam, one cycle to lr 3e-4, batch 64: the schedule DecomposeCallback
fine-tunes under; the dense model's own epoch under it, and under a constant 3e-4, is printed first for reference):

- weight-only: each layer at the same fraction, factorized from its weights (Tucker-2 / SVD);
- data-aware uniform: the same ranks, factors fitted on 8 calibration batches (`Calibration`, sequential), per method;
- one call: `decompose_model(model, 'auto', rank=Budget(params=...), calib=Calibration(..., sequential=True))`, the
  budget spending the same total on each layer's output errors and choosing each conv's method.

Run: python bench/composed.py [--epochs 15] [--threads 2]   (about a minute on two cores)
     python bench/composed.py --resnet50   (time of the one call on torchvision's resnet50 with 256 images of 224²)
"""
import argparse, copy, time, torch, torch.nn as nn, torch.nn.functional as F
from pathlib import Path
from sklearn.datasets import load_digits
from fasterai_lr.all import *
from fasterai_lr.calibrate import Calibration
from fasterai_lr.ranks import Budget, n_params

def digits(seed=0, size=16):
    X,y = load_digits(return_X_y=True)
    X = F.interpolate(torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8)/16, size=size, mode='bilinear', align_corners=False)
    p = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n = int(0.8*len(X))
    return (X[p[:n]], torch.tensor(y)[p[:n]]), (X[p[n:]], torch.tensor(y)[p[n:]])

def vgg_digits():
    c = lambda i,o: [nn.Conv2d(i, o, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*c(1, 32), *c(32, 64), nn.MaxPool2d(2), *c(64, 128), *c(128, 128), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2048, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))

def train(model, X, y, epochs, lr, bs=64, one_cycle=True, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr)
    steps = epochs*((len(X)+bs-1)//bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps) if one_cycle else None
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(X), generator=g).split(bs):
            loss = F.cross_entropy(model(X[i]), y[i])
            opt.zero_grad(); loss.backward(); opt.step()
            if sched: sched.step()
    return model.eval()

@torch.no_grad()
def scores(model, dense, X, y):
    "(relative logit error against the dense model, accuracy)"
    z,z0 = model(X), dense(X)
    return ((z-z0).norm()/z0.norm()).item(), (z.argmax(1)==y).float().mean().item()

def targets(model):
    "The layers compressed: every Linear and Conv2d that `decompose_model` would take (not the output layer; not a one-input-channel conv)"
    return [n for n,_,_,_ in __import__('fasterai_lr.ranks', fromlist=['candidates']).candidates(model, 'svd')]

def main(a):
    torch.manual_seed(0); torch.set_num_threads(a.threads)
    (Xtr,ytr),(Xte,yte) = digits()
    t,cache = time.perf_counter(),Path(__file__).parent/'out'/f'digits_vgg_{a.epochs}.pt'
    if cache.exists(): dense = vgg_digits(); dense.load_state_dict(torch.load(cache)); dense.eval()
    else: dense = train(vgg_digits(), Xtr, ytr, a.epochs, 2e-3); cache.parent.mkdir(exist_ok=True); torch.save(dense.state_dict(), cache)
    names = targets(dense)
    P,Pc = n_params(dense), sum(n_params(dense.get_submodule(n)) for n in names)
    print(f"VGG-style digits CNN: {P:,} parameters, test accuracy {scores(dense, dense, Xte, yte)[1]:.4f} (trained in {time.perf_counter()-t:.0f} s; kept in bench/out); "
          f"compressed: {names} ({Pc:,} parameters)", flush=True)
    batches = list(zip(Xtr.split(64), ytr.split(64)))[:8]
    for oc in (True, False):
        accs = [scores(train(copy.deepcopy(dense), Xtr, ytr, 1, 3e-4, one_cycle=oc, seed=s), dense, Xte, yte)[1] for s in (1, 2)]
        print(f"the dense model itself after 1 epoch of Adam at 3e-4 ({'one cycle' if oc else 'constant'}), two seeds: {accs[0]:.4f} {accs[1]:.4f}", flush=True)
    rows = []
    for keep in (0.25, 0.10):
        runs = {'weight-only tucker': lambda: decompose_model(dense, 'tucker', keep=keep, layers=names, quiet=True)[0],
                **{f'data-aware {m} (uniform)': (lambda m=m: decompose_model(dense, m, keep=keep, layers=names, quiet=True, calib=Calibration(batches, sequential=True))[0])
                   for m in ('svd', 'spatial', 'tucker', 'cp')},
                'one call (auto, Budget, calib)': lambda: decompose_model(dense, 'auto', rank=(b := Budget(params=(P - (1-keep)*Pc)/P)), layers=names, quiet=True,
                                                                          calib=Calibration(batches, sequential=True))[0]}
        for k,f in runs.items():
            t = time.perf_counter(); m = f(); dt = time.perf_counter()-t
            kept = (n_params(m) - (P-Pc))/Pc
            err,acc = scores(m, dense, Xte, yte)
            err_ft,acc_ft = scores(train(copy.deepcopy(m), Xtr, ytr, 1, 3e-4, seed=1), dense, Xte, yte)
            rows.append((keep, k, kept, err, acc, err_ft, acc_ft, dt))
            print(f"keep {keep:.0%}  {k:32} params {kept:6.1%}  logit err {err:.3f}  acc {acc:.4f}  | after 1 epoch: logit err {err_ft:.3f}  acc {acc_ft:.4f}  ({dt:.1f} s)", flush=True)
    print("\n| keep | how | params kept | logit err | acc | logit err, 1 epoch | acc, 1 epoch | seconds |\n|---|---|---|---|---|---|---|---|")
    for r in rows: print(f"| {r[0]:.2f} | {r[1]} | {r[2]:.1%} | {r[3]:.3f} | {r[4]:.4f} | {r[5]:.3f} | {r[6]:.4f} | {r[7]:.1f} |")
    print("goals: at 0.25 the one call ≤ 0.03 logit error and ≥ 0.99 accuracy; at 0.10 ≤ 0.12 and ≥ 0.985; no data-aware model loses accuracy in the epoch")

def resnet50(a):
    import torchvision
    torch.manual_seed(0); torch.set_num_threads(a.threads)
    model = torchvision.models.resnet50(weights=None).eval()
    xs = [torch.randn(32, 3, 224, 224) for _ in range(a.images//32)]
    t = time.perf_counter()
    with torch.no_grad():
        for x in xs: model(x)
    fwd = time.perf_counter()-t
    print(f"resnet50 (random weights), {a.images} images 224², {torch.get_num_threads()} threads: one plain forward pass {fwd:.1f} s", flush=True)
    for seq in (False, True):
        for meth in a.methods.split(','):
            t = time.perf_counter()
            new,rep = decompose_model(model, meth, rank=(b := Budget(params=0.5)), calib=Calibration(xs, n_batches=len(xs), sequential=seq, max_rows=a.max_rows), quiet=True)
            print(f"  decompose_model(resnet50, {meth!r}, rank=Budget(params=0.5), calib=Calibration({a.images} images, sequential={seq}, max_rows={a.max_rows})): "
                  f"{time.perf_counter()-t:.1f} s ({fwd and (time.perf_counter()-t)/fwd:.1f}× the forward pass); plan chosen: {b.chosen} of {b.checked}", flush=True)

if __name__=='__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--epochs', type=int, default=15)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--resnet50', action='store_true')
    ap.add_argument('--methods', default='svd,tucker', help="methods for --resnet50")
    ap.add_argument('--images', type=int, default=256, help="calibration images for --resnet50 (batches of 32)")
    ap.add_argument('--max-rows', type=int, default=8192, help="Calibration(max_rows=) for --resnet50: rows per batch and layer in a Gram")
    a = ap.parse_args()
    resnet50(a) if a.resnet50 else main(a)
