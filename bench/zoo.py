"""Every classification architecture in torchvision.models (weights=None) through every method: decompose (Conv2d by
the method at keep=0.5, Linear by SVD; 'budget': a whole-model `Budget(params=0.5)` of Tucker ranks), run forward,
and export to ONNX where the architecture itself exports, checked with onnxruntime. One row per model and method:
ok / error, layers decomposed, layers left as they are (with the reasons), parameters kept, ONNX, seconds.

Run: python bench/zoo.py [--quick] [--methods tucker,cp,svd,spatial,budget] [--models resnet18,vit_b_16]
                         [--no-onnx] [--dynamo] [--onnx-max-params 100e6] [--cp-max-params 12e6] [--out bench/out/zoo.txt]
Models run smallest first. `--cp-max-params` leaves CP out on bigger models (a row 'skip' says so): its ALS takes
seconds to minutes per model on one thread (resnet18 ~6 s, vgg16_bn ~14 s, regnet_y_128gf ~2 minutes; all 80 ~13 minutes,
bench/out/zoo_cp.txt).
It runs torch on one thread (`--threads`): beside any other load on a 2-core machine, two threads wait on each other
and run ~100× slower. The full run (80 models × 5 methods, ONNX included) then takes minutes, e.g.
    python bench/zoo.py --out bench/out/zoo.txt
"""
import argparse, collections, gc, re, sys, tempfile, time, traceback, torch, torchvision
from pathlib import Path
from torch import nn
from fasterai_lr.decompose import decompose_model
from fasterai_lr.export import to_onnx, onnx_error
try: from fasterai_lr.ranks import Budget
except ImportError: Budget = None

QUICK = ['resnet18', 'mobilenet_v3_small', 'efficientnet_b0', 'vit_b_16', 'convnext_tiny', 'regnet_x_400mf', 'squeezenet1_0', 'googlenet']
METHODS = ['tucker', 'cp', 'svd', 'spatial'] + (['budget'] if Budget else [])
SIZES = (64, 224, 299)  # the smallest input each architecture takes (ViTs and MaxViT need 224, Inception 299)

def n_params(m): return sum(p.numel() for p in m.parameters())

def size(name:str)->int:
    "Parameters of architecture `name`, from its weights' metadata (nothing downloaded or allocated)"
    return next(iter(torchvision.models.get_model_weights(name))).meta['num_params']

def build(name:str)->nn.Module:
    "Architecture `name`, untrained, in eval mode; weights left at zero by its init (ViT's head) drawn at random, or every output is 0 and comparisons are blind"
    model = torchvision.models.get_model(name, weights=None).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any(): p.normal_(0, 0.02)
    return model

def input_for(model:nn.Module)->torch.Tensor:
    "The smallest of `SIZES` that `model` runs on"
    errs = []
    for s in SIZES:
        x = torch.randn(1, 3, s, s)
        try:
            with torch.no_grad(): model(x)
            return x
        except Exception as e: errs.append(f"{s}: {e}")
    raise RuntimeError(f"no input size in {SIZES} runs: {errs}")

def decompose(model, method):
    if method=='budget': return decompose_model(model, 'tucker', rank=Budget(params=0.5).plan(model, 'tucker'), quiet=True)
    return decompose_model(model, method, keep=0.5, quiet=True)

def skipped(report)->dict:
    "{reason: count} of the layers left as they are (numbers in the reasons replaced by #)"
    notes = report.loc[report['method'].isna(), 'note'].fillna('')
    return dict(collections.Counter(re.sub(r'\d+', '#', n) or '(no note)' for n in notes))

def onnx_check(model, x, dynamo:bool, tol:float=1e-4)->str:
    "'ok (relative error)' or why not, for `model` exported on `x`"
    with tempfile.TemporaryDirectory() as d:
        err = onnx_error(to_onnx(model, x, f'{d}/m.onnx', dynamo=dynamo), model, x)
    if err > tol: raise AssertionError(f"onnxruntime differs from PyTorch by {err:.1e} (relative) > {tol:.0e}")
    return f"ok ({err:.0e})"

def zoo_row(name:str, method:str, model=None, x=None, onnx:bool=True, dynamo:bool=False, onnx_max:float=1e8, arch_onnx=None)->dict:
    "Decompose architecture `name` by `method`, run it forward, export it: a row of what happened"
    row = dict(model=name, method=method, status='error', decomposed=0, of=0, skipped={}, params=0, params_after=0, onnx='-', error='', secs=0.)
    t = time.perf_counter()
    try:
        model = build(name) if model is None else model
        x = input_for(model) if x is None else x
        with torch.no_grad(): y = model(x)
        new,rep = decompose(model, method)
        with torch.no_grad(): y2 = new(x)
        if y2.shape!=y.shape or not y2.isfinite().all(): raise AssertionError(f"output {tuple(y2.shape)}, finite: {bool(y2.isfinite().all())}; the model's {tuple(y.shape)}")
        row.update(status='ok', decomposed=int(rep['method'].notna().sum()), of=len(rep), skipped=skipped(rep), params=n_params(model), params_after=n_params(new))
        if not onnx: row['onnx'] = 'not asked'
        elif n_params(model) > onnx_max: row['onnx'] = f"skipped: {n_params(model)/1e6:.0f}M parameters > --onnx-max-params"
        elif arch_onnx not in (None, 'ok'): row['onnx'] = f"n/a: the architecture does not export ({arch_onnx})"
        else:
            try: row['onnx'] = onnx_check(new, x, dynamo)
            except Exception as e: row.update(status='error', onnx='error', error=f"onnx: {type(e).__name__}: {str(e)[:300]}")
        del new
    except Exception as e:
        row['error'] = f"{type(e).__name__}: {str(e)[:300]} @ {traceback.extract_tb(e.__traceback__)[-1].name}"
    row['secs'] = round(time.perf_counter()-t, 1)
    return row

def arch_exports(model, x, dynamo:bool)->str:
    "'ok' if the undecomposed architecture exports to ONNX, or the exporter's error"
    try:
        with tempfile.TemporaryDirectory() as d: to_onnx(model, x, f'{d}/m.onnx', dynamo=dynamo)
        return 'ok'
    except Exception as e: return f"{type(e).__name__}: {str(e)[:120]}"

def fmt(r:dict)->str:
    sk = '; '.join(f"{n}× {why}" for why,n in r['skipped'].items()) or '-'
    kept = f"{r['params_after']/r['params']:.0%}" if r['params'] else '-'
    return (f"{r['model']:20} {r['method']:8} {r['status']:6} {r['decomposed']:>4}/{r['of']:<4} {kept:>5} {r['secs']:7.1f}s  onnx: {r['onnx']}"
            f"  | skipped: {sk}" + (f"  | {'ERROR ' if r['status']=='error' else ''}{r['error']}" if r['error'] else ''))

def summary(rows:list)->str:
    by = collections.defaultdict(collections.Counter)
    for r in rows: by[r['method']][r['status']] += 1
    onnx_ok = sum(r['onnx'].startswith('ok') for r in rows)
    lines = [f"SUMMARY: {len({r['model'] for r in rows})} models, {len(rows)} model×method rows, "
             f"{sum(r['status']=='ok' for r in rows)} ok, {sum(r['status']=='error' for r in rows)} errors, {sum(r['status']=='skip' for r in rows)} skipped by option; ONNX checked ok on {onnx_ok} rows"]
    lines += [f"  {m:8} ok {c['ok']:3}  errors {c['error']:3}  skipped {c['skip']:3}" for m,c in by.items()]
    lines += [f"  ERROR {r['model']} {r['method']}: {r['error']}" for r in rows if r['status']=='error']
    return '\n'.join(lines)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help=f"only {', '.join(QUICK)}")
    p.add_argument('--models', help='comma-separated torchvision model names (default: all classification models)')
    p.add_argument('--methods', default=','.join(METHODS), help='comma-separated, from ' + ','.join(METHODS))
    p.add_argument('--no-onnx', action='store_true', help='skip the ONNX export')
    p.add_argument('--dynamo', action='store_true', help='use the torch.export-based ONNX exporter (needs onnxscript; slower)')
    p.add_argument('--onnx-max-params', type=float, default=1e8, help='export only models with at most this many parameters')
    p.add_argument('--cp-max-params', type=float, help='run CP only on models with at most this many parameters')
    p.add_argument('--out', help='also write the rows and the summary to this file')
    p.add_argument('--threads', type=int, default=1, help='torch threads (more than the free cores makes every op wait)')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = a.models.split(',') if a.models else QUICK if a.quick else torchvision.models.list_models(module=torchvision.models)
    names = sorted(names, key=size)
    methods = a.methods.split(',')
    if 'budget' in methods and Budget is None: sys.exit("--methods budget needs fasterai_lr.ranks.Budget")
    if a.out: Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    out = open(a.out, 'w') if a.out else None
    def say(s):
        print(s, flush=True)
        if out: out.write(s+'\n'); out.flush()
    say(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads; methods {methods}; ONNX {'off' if a.no_onnx else 'dynamo' if a.dynamo else 'TorchScript'}")
    say(f"{'model':20} {'method':8} {'status':6} {'decomposed':>9} {'kept':>5} {'time':>8}")
    rows = []
    for name in names:
        try:
            model = build(name); x = input_for(model)
            arch = arch_exports(model, x, a.dynamo) if not a.no_onnx and n_params(model) <= a.onnx_max_params else None
        except Exception as e:
            rows.append(r := dict(model=name, method='-', status='error', decomposed=0, of=0, skipped={}, params=0, params_after=0, onnx='-',
                                  error=f"building or running the original: {type(e).__name__}: {str(e)[:300]}", secs=0.)); say(fmt(r)); continue
        for m in methods:
            if m=='cp' and a.cp_max_params and n_params(model) > a.cp_max_params:
                rows.append(r := dict(model=name, method=m, status='skip', decomposed=0, of=0, skipped={}, params=n_params(model), params_after=0, onnx='-',
                                      error=f"skipped: {n_params(model)/1e6:.0f}M parameters > --cp-max-params", secs=0.)); say(fmt(r)); continue
            rows.append(r := zoo_row(name, m, model, x, not a.no_onnx, a.dynamo, a.onnx_max_params, arch)); say(fmt(r))
        del model; gc.collect()
    say(summary(rows))
    return rows

if __name__=='__main__': main()
