"""Real speed, side by side: dense models against their decompositions, on the CPU.

For torchvision resnet18, resnet50, mobilenet_v2, vgg16_bn (weights=None, 224×224) and a small digits CNN (8×8), at
batch 1 and 64: parameters, MACs and measured latency of
    dense       the model as given (NCHW)
    dense+opt   the same rewrites the decomposed models get: BatchNorms folded, channels_last (an honest baseline)
    tucker      plain `decompose_model(model, 'tucker', keep=0.5)` (Linear by SVD), as it comes (NCHW)
    tucker+opt  the same, BatchNorms folded, adjacent linear layers merged, channels_last
    aware+opt   `LatencyAware(keep=0.5, batch=B)`: each layer's fastest-for-its-error option within half its
                parameters, only where measured faster at this batch; then optimized
    budget+opt  `LatencyBudget(keep=0.5, batch=B)`: half the measured latency with the least error; then optimized
    fasterai    fasterai 0.4.1's Conv_Decomposer Tucker + FC_Decomposer SVD, its `percent_removed` set so that the
                model has as many parameters as `tucker`
    tltorch     tensorly-torch's FactorizedConv (Tucker, rank=0.5 of the parameters, 'factorized' forward; random
                factors: timing does not depend on the values). Linears stay dense: FactorizedLinear's factorized
                forward costs 6.5 GMACs for a 512×1000 layer (its tensorized contraction), which would swamp the table
All variants of one model and batch are timed in one run, interleaved (`time_calls`: rotating order, median of
--reps rounds), so their ratios share the machine's state. Ratios: speed-up = dense ms / variant ms, MAC ratio =
dense MACs / variant MACs, eff = speed-up / MAC ratio (1.0: every MAC saved is time saved).
fasterai and tltorch are imported from their wheels (`pip download --no-deps` into --wheels), without their
dependencies where possible; a column whose package does not import is skipped with a note.

Run: python bench/speed.py [--models resnet18,resnet50,mobilenet_v2,vgg16_bn,digits] [--batches 1,64] [--size 224]
                           [--threads N] [--clock wall|cpu] [--reps 5] [--variants ...] [--budget-models ...]
                           [--wheels DIR] [--cache FILE] [--out bench/out/speed.txt]
On a quiet machine: the defaults (wall time, all cores). On a shared one: --threads 1 --clock cpu (the main thread's
CPU time: what the work costs, not how long other jobs held the core). The full default run takes about an hour on 2 cores.
"""
import argparse, copy, gc, glob, importlib, os, subprocess, sys, time, traceback, torch, torchvision
from functools import partial
from pathlib import Path
from torch import nn
from fasterai_lr.decompose import decompose_model
from fasterai_lr.ranks import model_macs, n_params
from fasterai_lr.latency import LatencyAware, LatencyBudget, LatencyCache, optimize, time_calls

MODELS = ['resnet18', 'resnet50', 'mobilenet_v2', 'vgg16_bn', 'digits']
VARIANTS = ['dense', 'dense+opt', 'tucker', 'tucker+opt', 'aware+opt', 'budget+opt', 'fasterai', 'tltorch']
CL = torch.channels_last

def digits_cnn()->nn.Module:
    "A small CNN for sklearn's 8×8 digits, conv-BN-ReLU blocks"
    cbr = lambda i,o: [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*cbr(1, 32), *cbr(32, 64), nn.MaxPool2d(2), *cbr(64, 128), *cbr(128, 128), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))

def build(name:str, device='cpu')->tuple[nn.Module,tuple]:
    if name=='digits': return digits_cnn().eval().to(device), (1, 8, 8)
    return torchvision.models.get_model(name, weights=None).eval().to(device), None

# ---- the peers, from their wheels

def wheels(d:str, pkgs=('fasterai==0.4.1', 'einops', 'tensorly-torch'))->str:
    "Put the wheels in `d` on sys.path (downloading them with pip, without dependencies, when missing); a note of what happened"
    Path(d).mkdir(parents=True, exist_ok=True)
    if not glob.glob(f'{d}/*.whl'):
        r = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '-q', '-d', d, *pkgs], capture_output=True, text=True)
        if r.returncode: return f"pip download failed: {r.stderr.strip()[-200:]}"
    sys.path[:0] = sorted(glob.glob(f'{d}/*.whl'))
    return f"wheels from {d}: {', '.join(Path(w).name for w in glob.glob(f'{d}/*.whl'))}"

def peer(name:str):
    try:
        if name=='fasterai':
            from fasterai.misc.conv_decomposer import Conv_Decomposer as C
            from fasterai.misc.fc_decomposer import FC_Decomposer as F
            return C, F
        import tltorch, tensorly as tl
        tl.set_backend('pytorch')
        return tltorch
    except Exception as e: return f"{name} does not import: {type(e).__name__}: {e}"

def fasterai_params(model:nn.Module, p:float)->int:
    "Parameters of `model` after fasterai's Tucker (k×k convs, groups 1) and SVD (Linears) at percent_removed=p"
    total = n_params(model)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups==1 and min(m.kernel_size) > 1:
            ro,ri = max(1, int((1-p)*m.out_channels)), max(1, int((1-p)*m.in_channels))
            total += m.in_channels*ri + ri*ro*m.weight[0,0].numel() + ro*m.out_channels - m.weight.numel()
        elif isinstance(m, nn.Linear):
            L = max(1, int((1-p)*min(m.weight.shape)))
            total += L*(m.in_features+m.out_features) + m.out_features*(m.bias is None) - m.weight.numel()
    return total

def fasterai_model(model:nn.Module, target:int, mods)->tuple[nn.Module,str]:
    "fasterai's decomposition at the percent_removed whose parameter count is closest to `target` from below"
    lo,hi = 0., 0.99
    for _ in range(30):
        mid = (lo+hi)/2
        if fasterai_params(model, mid) > target: lo = mid
        else: hi = mid
    C,F = mods
    m = F().decompose(model, percent_removed=hi)
    try: note, out = '', C().decompose(m, percent_removed=hi, method='tucker')
    except RuntimeError:   # its HOOI fails where R_in·k² < R_out (a 3-channel stem at high percent_removed): leave the stems out
        stems = [n for n,c in m.named_modules() if isinstance(c, nn.Conv2d) and c.in_channels <= 3]
        note, out = f"; {', '.join(stems)} left out (fasterai's HOOI fails on it)", C().decompose(m, percent_removed=hi, method='tucker', exclude=stems)
    return out.eval().to(next(model.parameters()).device), f"percent_removed={hi:.3f}{note}"

def tltorch_model(model:nn.Module, tltorch)->tuple[nn.Module,str]:
    m, notes = copy.deepcopy(model), set()
    for n,c in list(m.named_modules()):
        try:
            if isinstance(c, nn.Conv2d) and c.groups==1:
                m.set_submodule(n, tltorch.FactorizedConv.from_conv(c, rank=0.5, factorization='tucker', implementation='factorized', decompose_weights=False))
        except Exception as e: notes.add(f"{type(c).__name__} left: {type(e).__name__}")
    return m.eval().to(next(model.parameters()).device), '; '.join(sorted(notes)) or 'convs only, random factors, rank=0.5'

# ---- one model at one batch

def variants(name, model, sample, batch, want, timer, cache, peers, budget_ok, device='cpu', budget_kw={})->tuple[dict,dict,dict]:
    "{variant: model}, {variant: note}, {variant: seconds to build}"
    out,notes,secs = {},{},{}
    def add(v, f):
        if v not in want: return
        t = time.perf_counter()
        try:
            r = f()
            out[v],notes[v] = r if isinstance(r, tuple) else (r, '')
        except Exception as e:
            notes[v] = f"failed: {type(e).__name__}: {str(e)[:240]}"; traceback.print_exc()
        secs[v] = time.perf_counter()-t
    add('dense', lambda: model)
    add('dense+opt', lambda: optimize(model, memory_format=CL))
    tucker = decompose_model(model, 'tucker', keep=0.5, quiet=True)[0] if {'tucker','tucker+opt','fasterai'} & set(want) else None
    add('tucker', lambda: tucker)
    add('tucker+opt', lambda: optimize(tucker, memory_format=CL))
    def aware():
        la = LatencyAware(keep=0.5, batch=batch, device=device, timer=timer, cache=cache)
        dec,_ = decompose_model(model, rank=la, sample=sample, quiet=True)
        r = la.report
        return optimize(dec, memory_format=CL), f"{int(r.method.notna().sum())}/{len(r)} layers decomposed"
    add('aware+opt', aware)
    def budget():
        lb = LatencyBudget(**{'keep': 0.5, **budget_kw}, batch=batch, device=device, timer=timer, cache=cache)
        dec,_ = decompose_model(model, rank=lb, sample=sample, quiet=True)
        r = lb.report
        t = lb.achieved*(lb.T_given if lb.baseline=='given' else lb.T_dense)   # `achieved` is a fraction of the budget's baseline
        return optimize(dec, memory_format=CL), (f"{int(r.method.notna().sum())}/{len(r)} layers; planned model measured at {t/lb.T_given:.2f} "
                                                 f"of dense, {t/lb.T_dense:.2f} of dense+fold")
    if budget_ok: add('budget+opt', budget)
    elif 'budget+opt' in want: notes['budget+opt'] = 'not run (--budget-models)'
    if 'fasterai' in want:
        if isinstance(peers['fasterai'], str): notes['fasterai'] = peers['fasterai']
        else: add('fasterai', lambda: fasterai_model(model, n_params(tucker), peers['fasterai']))
    if 'tltorch' in want:
        if isinstance(peers['tltorch'], str): notes['tltorch'] = peers['tltorch']
        else: add('tltorch', lambda: tltorch_model(model, peers['tltorch']))
    return out,notes,secs

def measure(mods:dict, x, reps, clock, max_s)->tuple[dict,dict]:
    "{variant: seconds} timed side by side; a variant whose one call takes over `max_s` seconds is left out (noted)"
    notes,keep = {},{}
    with torch.inference_mode():
        for v,m in mods.items():
            t = clock(); m(x[:1]); dt = (clock()-t)*len(x)   # a guess from batch 1, before a call that could take an hour
            if dt <= max_s: t = clock(); m(x); dt = clock()-t
            if dt > max_s: notes[v] = f"not timed: one call takes ~{dt:.0f} s (> --max-seconds)"
            else: keep[v] = m
    big = x.shape[0] > 1
    ts = time_calls(list(keep.values()), x, reps=reps, min_time=0 if big else 5e-3, warmup=1, clock=clock)
    return dict(zip(keep, ts)), notes

def rows_for(name, batch, a, timer, cache, peers, say)->list:
    model, sample = build(name, a.device)
    sample = sample or (3, a.size, a.size)
    x = torch.randn(batch, *sample, device=a.device)
    mods,notes,secs = variants(name, model, sample, batch, a.variants, timer, cache, peers, name in a.budget_models, a.device,
                               dict(keep=a.budget_keep, baseline=a.budget_baseline))
    ts,tn = measure(mods, x, a.reps, a.clock_fn, a.max_seconds)
    notes.update(tn)
    P0, M0 = n_params(model), model_macs(model, sample)
    rows = []
    for v in a.variants:
        m = mods.get(v)
        r = dict(model=name, batch=batch, variant=v, note=notes.get(v, ''), build_s=secs.get(v))
        if m is not None:
            P1, M1 = n_params(m), model_macs(m, sample)
            r.update(params=P1, params_ratio=P1/P0, macs=M1, mac_ratio=M0/M1)
        if v in ts:
            r.update(ms=ts[v]*1e3, speedup=ts['dense']/ts[v] if 'dense' in ts else None,
                     vs_opt=ts['dense+opt']/ts[v] if 'dense+opt' in ts else None)
            if r.get('speedup') and r.get('mac_ratio'): r['eff'] = r['speedup']/r['mac_ratio']
        rows.append(r); say(fmt(r))
    del mods; gc.collect()
    return rows

HEAD = f"{'model':13} {'batch':>5} {'variant':11} {'params':>8} {'kept':>5} {'GMACs':>7} {'MAC×':>5} {'ms':>9} {'speed×':>6} {'vs opt':>6} {'eff':>5}  note"

def fmt(r:dict)->str:
    f = lambda k, spec, d='-': format(r[k], spec) if r.get(k) is not None else d
    return (f"{r['model']:13} {r['batch']:>5} {r['variant']:11} {f('params', '8.2e'):>8} {f('params_ratio', '5.2f'):>5} "
            f"{(format(r['macs']/1e9, '7.3f') if r.get('macs') is not None else '-'):>7} {f('mac_ratio', '5.2f'):>5} {f('ms', '9.2f'):>9} "
            f"{f('speedup', '6.2f'):>6} {f('vs_opt', '6.2f'):>6} {f('eff', '5.2f'):>5}  {r['note']}"
            + (f" (built in {r['build_s']:.0f} s)" if r.get('build_s') and r['build_s'] > 5 else ''))

def checks(rows)->list[str]:
    "The issue's goals, each with PASS/FAIL and the figures"
    get = lambda m,b,v: next((r for r in rows if (r['model'],r['batch'],r['variant'])==(m,b,v)), {})
    out = []
    for m in ['resnet18', 'resnet50', 'mobilenet_v2', 'vgg16_bn']:
        r1, r64 = get(m, 1, 'aware+opt'), get(m, 64, 'aware+opt')
        if r1.get('speedup'): out.append(f"{'PASS' if r1['speedup'] >= 1.0 else 'FAIL'}  {m} aware+opt batch 1: {r1['speedup']:.2f}× dense (goal ≥ 1.0×); {r1.get('vs_opt') or 0:.2f}× dense+opt")
        if r64.get('speedup'): out.append(f"{'PASS' if r64['speedup'] >= 0.9*r64['mac_ratio'] else 'FAIL'}  {m} aware+opt batch 64: {r64['speedup']:.2f}× dense at MAC ratio {r64['mac_ratio']:.2f} "
                                          f"(goal ≥ 0.9×MAC = {0.9*r64['mac_ratio']:.2f}); vs dense+opt {r64.get('vs_opt') or 0:.2f}× (eff {r64['vs_opt']/r64['mac_ratio']:.2f})")
    b = get('resnet50', 64, 'budget+opt')
    if b.get('speedup') and b['note'].startswith('0/'): out.append("NOTE  resnet50 budget batch 64: folding and channels_last alone met the budget: no layer was decomposed")
    if b.get('speedup'): out.append(f"{'PASS' if b['speedup'] >= 1.8 else 'FAIL'}  resnet50 budget keep=0.5 batch 64: {b['speedup']:.2f}× dense (goal ≥ 1.8×); {b.get('vs_opt') or 0:.2f}× dense+opt")
    return out

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', default=','.join(MODELS))
    p.add_argument('--batches', default='1,64')
    p.add_argument('--size', type=int, default=224, help='input height and width of the torchvision models')
    p.add_argument('--device', default='cpu', help="'cuda' on a machine with a GPU (reported in the header)")
    p.add_argument('--threads', type=int, default=torch.get_num_threads())
    p.add_argument('--clock', choices=['wall', 'cpu'], default='wall', help="wall: latency; cpu: the main thread's CPU time (needs --threads 1)")
    p.add_argument('--reps', type=int, default=5, help='interleaved rounds; medians are reported')
    p.add_argument('--variants', default=','.join(VARIANTS))
    p.add_argument('--budget-models', default=','.join(MODELS), help='models to run the latency budget on (it times every layer at many ranks)')
    p.add_argument('--budget-keep', type=float, default=0.5, help='the fraction of the latency the budget keeps')
    p.add_argument('--budget-baseline', choices=['given', 'as_run'], default='given',
                   help="given: of the dense model as it came; as_run: of the dense model folded and channels_last (what the decomposition adds)")
    p.add_argument('--max-seconds', type=float, default=60., help='leave out a variant whose one call takes longer')
    p.add_argument('--wheels', default=os.path.expanduser('~/.cache/fasterai_lr/wheels'), help='where the peers\' wheels are (downloaded if empty)')
    p.add_argument('--cache', help='a JSON file to keep layer latencies in between runs (same machine and load only)')
    p.add_argument('--out', default='bench/out/speed.txt')
    a = p.parse_args(argv)
    if a.clock=='cpu' and (a.threads!=1 or a.device!='cpu'): sys.exit("--clock cpu measures the main thread's CPU time: use it with --threads 1 on the CPU")
    torch.set_num_threads(a.threads)
    a.clock_fn = time.perf_counter if a.clock=='wall' else time.thread_time
    a.variants, a.budget_models = a.variants.split(','), a.budget_models.split(',')
    timer = partial(time_calls, reps=a.reps, clock=a.clock_fn, warmup=1)
    cache = LatencyCache(a.cache)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    out = open(a.out, 'w')
    def say(s=''):
        print(s, flush=True); out.write(s+'\n'); out.flush()
    up = lambda: subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    say(f"bench/speed.py {' '.join(sys.argv[1:])}")
    gpu = torch.cuda.get_device_name(a.device) if a.device.startswith('cuda') else None
    say(f"torch {torch.__version__}, torchvision {torchvision.__version__}; {gpu or 'CPU'}, {a.threads} CPU thread(s), clock={a.clock}, {a.reps} interleaved rounds, input {a.size}×{a.size}")
    if gpu is None: say(f"GPU: {'none on this machine' if not torch.cuda.is_available() else 'not used'} (with one: --device cuda, reported separately); CPU figures only")
    say(f"uptime before: {up()}")
    peers = {}
    if {'fasterai','tltorch'} & set(a.variants):
        say(wheels(a.wheels))
        peers = {k: peer(k) for k in ('fasterai', 'tltorch')}
        for k,v in peers.items(): say(f"{k}: {v if isinstance(v, str) else 'imported'}")
    say(HEAD)
    rows, t0 = [], time.perf_counter()
    for name in a.models.split(','):
        for b in map(int, a.batches.split(',')):
            try: rows += rows_for(name, b, a, timer, cache, peers, say)
            except Exception as e: say(f"{name:13} {b:>5} ERROR {type(e).__name__}: {str(e)[:300]}"); traceback.print_exc()
            if a.cache: cache.save()
        say()
    say("\n".join(checks(rows)))
    say(f"uptime after: {up()}; total {time.perf_counter()-t0:.0f} s")
    return rows

if __name__=='__main__': main()
