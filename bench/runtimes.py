"""Speed where models are deployed: dense against decomposed in eager PyTorch, torch.compile (inductor, CPU) and onnxruntime (CPU),
side by side in one run.

The baseline is the dense model with its BatchNorms folded (`fold_bn`), which every runtime does by itself: the speed-ups are the
decomposition's own. Variants, per model and batch:
    dense     the folded dense model
    keep=0.5  decompose_model(model, 'tucker', keep=0.5) (Linear by SVD), then `optimize` (folded, adjacent linear layers merged)
    keep=0.5 exact  the same with round_to=1: the exact ranks, not multiples of 8 (the default since ranks off the 8-channel block
              take a conv out of onnxruntime's NCHWc layout); keep=0.5 r16: round_to=16 (the block on AVX-512)
    latency   LatencyBudget(keep=0.5, batch=B, baseline='as_run'): half the folded dense model's latency, measured layer by layer in
              eager PyTorch on --device, with the least error; then `optimize`; aware: LatencyAware(keep=0.5) timed the same way
    aware-ort, latency-ort: LatencyAware(keep=0.5) / LatencyBudget(keep=0.5) timed in onnxruntime (`runtime_timer`): each layer's
              method and rank chosen by the time it takes there; aware-compile, latency-compile: the same timed in `compile_model`
    params=0.5  Budget(params=0.5) with its speed guard (the default)
    params=p, macs=p (digits only, --budgets): Budget(params=p) / Budget(macs=p), whose speed guard (on by default) leaves a layer
              whose factorization is modelled slower than it; 'p no guard' with speed=None
Eager runs channels_last where `fastest_format` measures it faster (the same format for the dense model and its decomposition);
compile is `compile_model` in channels_last, each model with COMPILE_OPTIONS (frozen weights packed for oneDNN) or inductor's
defaults, whichever it runs faster (the line before the table says which); --compile tuned: COMPILE_OPTIONS only,
--compile tuned-nchw: COMPILE_OPTIONS with the weights left in NCHW, --compile plain: `torch.compile(model)` as it comes; onnxruntime runs the
TorchScript export with all graph optimizations, `--threads` intra-op threads. --reuse-memory: `reuse_cpu_memory()` first (glibc keeps
freed memory for the next call instead of faulting big activations in afresh; onnxruntime has its own arena). Every variant of one model, batch and runtime is
timed in one `time_calls` (rotating order, median of --reps rounds), so their ratios share the machine's state.
Columns: ms per batch, speed-up = dense ms / variant ms, MAC ratio = dense MACs / variant MACs, their quotient (1.0: every MAC saved
is time saved). The digits CNN (sklearn's 8×8 digits, trained here in seconds) is the trained model; the torchvision models have
random weights (timing does not depend on the values).

--ceiling: each variant's `runtime_profile` in onnxruntime and compile, and its `speedup_ceiling` against the dense model's: the share
of time and of multiply-adds in ops a decomposition does not take (depthwise convs, pooling, layout copies, inductor's own kernels),
and the most speed-up ÷ MAC ratio (as run) that leaves, were every conv and Linear to run its share of the multiply-adds at its dense rate.
--device cuda: eager and compile on the GPU (onnxruntime is skipped: `OrtRunner` runs on the CPU), in each of --dtypes (float32,
bfloat16, float16: the models decomposed in float32, then cast; the latency rules time their layers in float32); --deadline S: past S
seconds no runtime is started for a new model and batch (a lease on a GPU machine), the table shows what was measured.
Run: python bench/runtimes.py [--models resnet18,resnet50,mobilenet_v2,vgg16_bn,digits] [--batches 1,64] [--runtimes eager,compile,ort]
                              [--threads 1] [--reps 5] [--size 224] [--budgets 0.26,0.5] [--compile fastest|tuned|tuned-nchw|plain] [--reuse-memory] [--ceiling] [--device cuda] [--dtypes float32,bfloat16] [--deadline 480] [--out bench/out/runtimes.txt]
On a 2-core machine shared with other work: --threads 1 (the default here), and other jobs under `nice -n 19`.
"""
import argparse, copy, gc, os, subprocess, sys, time, traceback, warnings, torch
from pathlib import Path
from torch import nn
sys.path.insert(0, str(Path(__file__).parent))
from speed import build
from budgets import digits_data, digits_cnn, train
from fasterai_lr.decompose import decompose_model
from fasterai_lr.ranks import Budget, model_macs, n_params
from fasterai_lr.latency import runtime_profile, speedup_ceiling, COMPILE_OPTIONS, compile_model, LatencyAware, LatencyBudget, fold_bn, optimize, fastest_format, in_format, in_runtime, reuse_cpu_memory, runtime_timer, time_calls

RUNTIMES = ['eager', 'compile', 'ort']

def digits_model():
    torch.manual_seed(0)
    (Xt,yt),(Xv,yv) = digits_data()
    m = train(digits_cnn(), Xt, yt)
    return m, (1, 8, 8), (Xv, yv)

def variants(name, model, sample, batch, a)->dict:
    "{variant: (inference model, note)}"
    out = {'dense': (fold_bn(copy.deepcopy(model).eval()), '')}
    def add(v, f):
        t = time.perf_counter()
        try: m, note = f()
        except Exception as e: traceback.print_exc(); out[v] = (None, f"failed: {type(e).__name__}: {str(e)[:200]}"); return
        out[v] = (m, f"{note} (built in {time.perf_counter()-t:.0f} s)")
    def dec(rank=None, **kw):
        d, r = decompose_model(model, 'tucker', rank=rank, sample=sample, quiet=True, **kw)
        return optimize(d, memory_format=torch.contiguous_format), f"{int(r.method.notna().sum()) if 'method' in r else '?'}/{len(r)} layers"
    add('keep=0.5', lambda: dec(keep=0.5))
    if 'keep=0.5 exact' in a.variants: add('keep=0.5 exact', lambda: dec(keep=0.5, round_to=1))
    if 'keep=0.5 r16' in a.variants: add('keep=0.5 r16', lambda: dec(keep=0.5, round_to=16))
    def latency():
        lb = LatencyBudget(keep=0.5, batch=batch, baseline='as_run', device=a.device)
        m, note = dec(rank=lb)
        return m, f"{note}; planned at {lb.achieved:.2f} of the folded dense latency"
    if 'latency' in a.variants: add('latency', latency)
    if 'aware' in a.variants: add('aware', lambda: dec(rank=LatencyAware(keep=0.5, batch=batch, device=a.device)))
    def timed_rule(kind, runtime):
        t = runtime_timer(runtime, a.threads, reps=3)
        rule = LatencyAware(keep=0.5, batch=batch, timer=t) if kind=='aware' else LatencyBudget(keep=0.5, batch=batch, baseline='as_run', timer=t)
        m, note = dec(rank=rule)
        return m, note + ('' if kind=='aware' else f"; planned at {rule.achieved:.2f} of the folded dense latency in {runtime}")
    for kind in ('aware', 'latency'):
        for short,runtime in (('ort', 'onnxruntime'), ('compile', 'compile')):
            if f'{kind}-{short}' in a.variants: add(f'{kind}-{short}', lambda kind=kind, runtime=runtime: timed_rule(kind, runtime))
    if 'params=0.5' in a.variants and name!='digits': add('params=0.5', lambda: dec(rank=Budget(params=0.5, sample=sample)))
    if name=='digits':
        for p in a.budgets:
            for by in ('params', 'macs'):
                add(f"{by}={p}", lambda by=by, p=p: dec(rank=Budget(**{by: p}, sample=sample)))
                add(f"{by}={p} no guard", lambda by=by, p=p: dec(rank=Budget(**{by: p}, sample=sample, speed=None)))
    return out

def compile_options(a): return {'fastest': 'fastest', 'tuned': COMPILE_OPTIONS, 'tuned-nchw': COMPILE_OPTIONS, 'plain': None}[a.compile]

def ceilings(mods:dict, sample, batch:int, rt:str, a, say)->dict:
    "{variant: `speedup_ceiling` against the dense model} from `runtime_profile`s in `rt`"
    prof = {v: runtime_profile(m, sample, batch, 'onnxruntime' if rt=='ort' else rt, a.threads, reps=a.reps, options=compile_options(a)) for v,m in mods.items()}
    out = {v: speedup_ceiling(prof['dense'], p) for v,p in prof.items() if v!='dense'}
    for v,c in out.items():
        say(f"  {v} {rt} ceiling: untouched ops take {c.untouched_time:.0%} of the dense time, {c.untouched_macs:.1%} of its MACs; speed-up "
            f"{c.speedup:.2f} of at most {c.ceiling:.2f}; ÷MAC as run {c.of_mac:.2f}, at most {c.ceiling_of_mac:.2f}")
    return out

def runners(mods:dict, x, runtime:str, a)->tuple[dict,str]:
    "({variant: callable} in `runtime`, how they run), compiled/exported here (compile time is not timed)"
    if runtime=='eager':
        fmt = fastest_format(mods['dense'], tuple(x.shape[1:]), x.shape[0])
        return {v: in_format(copy.deepcopy(m), fmt) for v,m in mods.items()}, 'channels_last' if fmt==torch.channels_last else 'NCHW'
    if runtime=='ort': return {v: in_runtime(m, x, 'onnxruntime', a.threads) for v,m in mods.items()}, ''
    out = {v: compile_model(m, x, compile_options(a), torch.channels_last if a.compile in ('fastest', 'tuned') else None) for v,m in mods.items()}
    return out, 'inductor options: ' + ', '.join(f"{v} {'tuned' if r.options==COMPILE_OPTIONS else r.options or 'defaults'}" for v,r in out.items())

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
SHORT = {'float32': '', 'bfloat16': ' bf16', 'float16': ' fp16'}

def rows_for(name, batch, a, say)->list:
    model, sample, data = digits_model() if name=='digits' else (*build(name), None)
    sample = sample or (3, a.size, a.size)
    built = variants(name, model, sample, batch, a)
    return [r for dt in a.dtypes for r in timed_rows(name + SHORT[dt], batch, built, DTYPES[dt], sample, data, a, say)]

def past_deadline(a)->bool: return bool(a.deadline) and time.perf_counter() - a.t0 > a.deadline

def timed_rows(name, batch, built:dict, dtype, sample, data, a, say)->list:
    "The rows of `built`'s variants run on --device in `dtype`, timed in each of --runtimes"
    cpu = {v: m for v,(m,_) in built.items() if m is not None}
    mods = {v: copy.deepcopy(m).to(a.device, dtype) for v,m in cpu.items()}
    x, M0, rows = torch.randn(batch, *sample, device=a.device, dtype=dtype), model_macs(cpu['dense'], sample), []
    for v,(m,note) in built.items():
        r = dict(model=name, batch=batch, variant=v, note=note)
        if m is not None:
            r.update(params=n_params(m), kept=n_params(m)/n_params(cpu['dense']), mac_ratio=M0/model_macs(cpu[v], sample))
            if data is not None:
                with torch.no_grad(): r['acc'] = float((mods[v](data[0].to(x)).argmax(1).cpu()==data[1]).float().mean())
        rows.append(r)
    for rt in a.runtimes:
        t = time.perf_counter()
        if past_deadline(a): say(f"  {name} batch {batch} {rt}: skipped, past the deadline ({a.deadline:.0f} s)"); continue
        if rt=='ort' and x.device.type!='cpu':
            import onnxruntime; say(f"  {name} batch {batch} ort: skipped on {x.device} (onnxruntime's providers here: {onnxruntime.get_available_providers()})"); continue
        try:
            run, how = runners(mods, x, rt, a)
            ts = dict(zip(run, time_calls(list(run.values()), x, reps=a.reps, warmup=1, min_time=0 if batch > 1 else 0.05)))
        except Exception as e:
            traceback.print_exc(); say(f"{name} {batch} {rt}: ERROR {type(e).__name__}: {str(e)[:300]}"); continue
        for r in rows:
            if r['variant'] in ts:
                r[rt] = ts[r['variant']]*1e3; r[rt+'_x'] = ts['dense']/ts[r['variant']]
        say(f"  {name} batch {batch} {rt}: timed in {time.perf_counter()-t:.0f} s" + (f" ({how})" if how else ''))
        del run; gc.collect()
        if a.ceiling and rt!='eager' and x.device.type=='cpu':
            for v,c in ceilings(mods, sample, batch, rt, a, say).items(): next(r for r in rows if r['variant']==v)[rt+'_ceiling'] = c.ceiling_of_mac
    for r in rows: say(fmt_row(r, a.runtimes))
    return rows

def head(rts): return f"{'model':12} {'batch':>5} {'variant':17} {'kept':>5} {'acc':>5} {'MAC×':>5} " + ' '.join(f"{rt+' ms':>10} {'×':>5} {'÷MAC':>5}" for rt in rts) + '  note'

def fmt_row(r, rts):
    f = lambda k, s: format(r[k], s) if r.get(k) is not None else '-'
    q = lambda rt: format(r[rt+'_x']/r['mac_ratio'], '5.2f') if r.get(rt+'_x') and r.get('mac_ratio') else '-'
    return (f"{r['model']:12} {r['batch']:>5} {r['variant']:17} {f('kept', '5.2f'):>5} {f('acc', '5.3f'):>5} {f('mac_ratio', '5.2f'):>5} "
            + ' '.join(f"{f(rt, '10.2f'):>10} {f(rt+'_x', '5.2f'):>5} {q(rt):>5}" for rt in rts) + f"  {r['note']}")

def checks(rows, rts)->list[str]:
    "The issue's goals, PASS/FAIL with the figures"
    out = []
    for r in rows:
        if r['variant']=='dense' or 'no guard' in r['variant']: continue
        for rt in rts:
            x = r.get(rt+'_x')
            if x is None: continue
            if r['batch']==1: out.append(f"{'PASS' if x >= 1 else 'FAIL'}  {r['model']} {r['variant']} batch 1 {rt}: {x:.2f}× the folded dense model (goal ≥ 1)")
            elif r['model']!='digits' and rt!='eager':
                c = f"; the ops it cannot take cap it (as run) at {r[rt+'_ceiling']:.2f}" if rt+'_ceiling' in r else ''
                out.append(f"{'PASS' if x/r['mac_ratio'] >= 0.9 else 'FAIL'}  {r['model']} {r['variant']} batch {r['batch']} {rt}: speed-up {x:.2f} ÷ MAC ratio {r['mac_ratio']:.2f} = {x/r['mac_ratio']:.2f} (goal ≥ 0.9{c})")
    return out

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', default='resnet18,resnet50,mobilenet_v2,vgg16_bn,digits')
    p.add_argument('--batches', default='1,64'); p.add_argument('--runtimes', default=','.join(RUNTIMES))
    p.add_argument('--variants', default='keep=0.5,keep=0.5 exact,latency,params=0.5,aware-ort,latency-ort'); p.add_argument('--budgets', default='0.26,0.5')
    p.add_argument('--threads', type=int, default=1); p.add_argument('--reps', type=int, default=5)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--compile', default='fastest', choices=['fastest', 'tuned', 'tuned-nchw', 'plain'])
    p.add_argument('--reuse-memory', action='store_true', help='reuse_cpu_memory() before timing')
    p.add_argument('--ceiling', action='store_true', help="each variant's speedup_ceiling from runtime_profiles (onnxruntime, compile)")
    p.add_argument('--device', default='cpu', help="'cuda': eager and compile on the GPU")
    p.add_argument('--dtypes', default='float32', help=f"comma-separated, of {', '.join(DTYPES)}")
    p.add_argument('--deadline', type=float, default=0, help='seconds after which no runtime starts for a new model and batch (0: none)')
    p.add_argument('--out', default='bench/out/runtimes.txt')
    a = p.parse_args(argv)
    a.runtimes, a.variants, a.budgets = a.runtimes.split(','), a.variants.split(','), [float(b) for b in a.budgets.split(',') if b]
    a.dtypes, a.t0 = a.dtypes.split(','), time.perf_counter()
    if bad := set(a.dtypes) - set(DTYPES): p.error(f"--dtypes {','.join(bad)}: pass some of {', '.join(DTYPES)}")
    torch.set_num_threads(a.threads); os.environ.setdefault('TORCHINDUCTOR_COMPILE_THREADS', '1'); warnings.filterwarnings('ignore')
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    out = open(a.out, 'w')
    def say(s=''): print(s, flush=True); out.write(s+'\n'); out.flush()
    import onnxruntime
    up = lambda: subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    reused = a.reuse_memory and reuse_cpu_memory()
    say(f"bench/runtimes.py {' '.join(argv or sys.argv[1:])}")
    say(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; CPU, {a.threads} thread(s); {a.reps} interleaved rounds; "
        f"input {a.size}×{a.size}; compile {a.compile}; memory {'reused (reuse_cpu_memory)' if reused else 'glibc defaults'}; GPU: {torch.cuda.get_device_name(a.device) + ' (used)' if a.device.startswith('cuda') else 'none on this machine' if not torch.cuda.is_available() else 'not used'}; dtypes {','.join(a.dtypes)}")
    say(f"uptime before: {up()}"); say(head(a.runtimes))
    rows = []
    for name in a.models.split(','):
        for b in map(int, a.batches.split(',')):
            if past_deadline(a): say(f"{name} {b}: skipped, past the deadline ({a.deadline:.0f} s)"); continue
            try: rows += rows_for(name, b, a, say)
            except Exception as e: say(f"{name} {b} ERROR {type(e).__name__}: {str(e)[:300]}"); traceback.print_exc()
    say(); say(head(a.runtimes))
    for r in rows: say(fmt_row(r, a.runtimes))
    say(); say('\n'.join(checks(rows, a.runtimes)))
    say(f"uptime after: {up()}; total {time.perf_counter()-a.t0:.0f} s")

if __name__=='__main__': main()
