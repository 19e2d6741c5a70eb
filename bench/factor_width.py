"""How much of its MAC ratio a Tucker-2 block keeps as speed, against its ranks: one conv and its blocks timed side by side in one run.

The question behind the batch-64 gap under torch.compile: a thin factor runs fewer multiply-adds per second than the dense conv (its
channels underfill the vector blocks of oneDNN's kernels), so halving a 64-channel layer keeps less of the MAC ratio than halving a
512-channel one. Per layer shape, the dense conv and a Tucker block at each rank pair, in `--runtime` (compile: `compile_model` with
COMPILE_OPTIONS; eager; ort), with the memory reused (`reuse_cpu_memory`; --glibc for glibc's defaults). Columns: ms per batch,
GMAC/s, speed-up, MAC ratio and their quotient (1.0: every MAC saved is time saved).

Run: python bench/factor_width.py [--runtime compile|eager|ort] [--batch 64] [--reps 5] [--glibc]
"""
import argparse, torch
from torch import nn
from fasterai_lr.decompose import Conv_Decomposer
from fasterai_lr.latency import COMPILE_OPTIONS, compile_model, in_runtime, reuse_cpu_memory, time_calls
from fasterai_lr.ranks import model_macs

SHAPES = [(64, 56, [(16, 64), (24, 64), (32, 64), (24, 24), (32, 32), (48, 48)]),   # (channels, input size, Tucker ranks): resnet's stages
          (128, 28, [(48, 128), (56, 128), (64, 128), (56, 56), (64, 64)]),
          (256, 14, [(96, 256), (112, 256), (128, 128)]),
          (512, 7, [(224, 512), (256, 256)])]

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--runtime', default='compile', choices=['compile', 'eager', 'ort']); p.add_argument('--batch', type=int, default=64)
    p.add_argument('--reps', type=int, default=5); p.add_argument('--glibc', action='store_true', help="glibc's malloc as it comes")
    a = p.parse_args(argv)
    torch.set_num_threads(1); torch.manual_seed(0)
    print(f"torch {torch.__version__}, {a.runtime}, batch {a.batch}, 1 thread, {torch.backends.cpu.get_cpu_capability()}, memory "
          + ('glibc defaults' if a.glibc or not reuse_cpu_memory() else 'reused'))
    run = lambda m, x: compile_model(m, x, COMPILE_OPTIONS) if a.runtime=='compile' else in_runtime(m, x, 'onnxruntime' if a.runtime=='ort' else 'eager')
    for c, hw, ranks in SHAPES:
        conv, x = nn.Conv2d(c, c, 3, padding=1).eval(), torch.randn(a.batch, c, hw, hw)
        mods = [conv] + [Conv_Decomposer().Tucker(conv, rank=r).eval() for r in ranks]
        ts = time_calls([run(m, x) for m in mods], x, reps=a.reps, warmup=1)
        macs = [model_macs(m, (c, hw, hw)) for m in mods]
        for r, t, m in zip(['dense', *ranks], ts, macs):
            print(f"{c:4}→{c:<4} 3×3 @{hw:3}  {str(r):11} {t*1e3:8.1f} ms {m*a.batch/t/1e9:6.1f} GMAC/s  speed-up {ts[0]/t:5.2f}"
                  f"  MAC× {macs[0]/m:5.2f}  ÷MAC {ts[0]/t/(macs[0]/m):5.2f}", flush=True)

if __name__ == '__main__': main()
