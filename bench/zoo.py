"""Model zoos through every method, as benchmarks (bench/, not in the test suite). The suites (`--suite`):
  classification  every torchvision.models classification architecture (weights=None)
  segmentation    every torchvision.models.segmentation model (weights=None, weights_backbone=None, aux_loss=False); output: 'out'
  detection       the `.backbone` of every torchvision.models.detection model (weights=None, weights_backbone=None): the feature
                  extractor + FPN (SSD's: VGG/MobileNet + extra layers); output: its OrderedDict of feature maps. The heads (RPN, ROI,
                  box/class/mask/keypoint heads) are out of scope: they take image lists and targets, not one tensor
  timm            one model per timm family (a timm module: resnet, vision_transformer, ...; its smallest model by parameters, up to
                  --timm-max-params), pretrained=False, on its pretrained_cfg['input_size']. timm is no dependency: install it with
                  `python -m pip install --target /tmp/timm_pkg timm --no-deps` (--timm-path); the parameter counts of all timm models
                  (built on the meta device, ~10 minutes once) are kept in --timm-sizes
  hf              Hugging Face transformers built offline from small configs with random weights (2 layers, hidden 64, 4 heads,
                  vocab 1000): BERT, DistilBERT, RoBERTa, GPT-2, ViT, T5 (decoder_input_ids = input_ids); output: last_hidden_state
Untrained models are made to show their errors: weights an init leaves at zero (ViT's head) are drawn at random, layer scales left at
a tiny constant (ConvNeXt's 1e-6) set to 1, and BatchNorm statistics set on 4 random batches (with the init's (0, 1) statistics
activations can vanish: deeplabv3_mobilenet_v3_large's backbone ended at ~1e-8 and its output was its last bias); a line '#' per model
says how much its output moves for another input ('BLIND' when it hardly does) and counts the weights that the walk does not take
(in no nn.Linear/nn.Conv2d: embeddings, GPT-2's transformers Conv1D, nn.MultiheadAttention's in_proj, ...).
One row per model and method: `full` the relative output error of decompose_model(model, method, rank='full') (must be <= 1e-4: above,
the same is run in float64, where it is exact to ~1e-12, and the miss is the float32 roundoff of the deep random model itself: the row is
an expected failure, 'n/a'); `keep` the relative error at keep=0.5 (Conv2d by the method, Linear by SVD; 'budget': a whole-model
Budget(params=0.5) of Tucker ranks), which must run, finite and of the same shape (random weights have flat spectra: ~1 is no bug),
and the parameters kept; layers decomposed/of; seconds; ONNX (TorchScript exporter unless --dynamo; onnxruntime within 1e-4) where the
original architecture exports; the reasons layers were left (counted). One summary line per suite, every failure named.

Run: python bench/zoo.py [--suite classification|segmentation|detection|timm|hf|all] [--quick] [--methods tucker,cp,svd,spatial,budget]
                         [--models resnet18,vit_b_16] [--no-onnx] [--dynamo] [--onnx-max-params 100e6] [--cp-max-params 12e6]
                         [--timm-path /tmp/timm_pkg] [--timm-max-params 20e6] [--out bench/out/zoo_{suite}.txt]
Models run smallest first. `--cp-max-params` leaves CP out on bigger models (a row 'skip' says so): its ALS takes
seconds to minutes per model on one thread (resnet18 ~6 s, vgg16_bn ~14 s, regnet_y_128gf ~2 minutes; all 80 ~13 minutes,
bench/out/zoo_cp.txt).
It runs torch on one thread (`--threads`): beside any other load on a 2-core machine, two threads wait on each other
and run ~100× slower. Each suite's output is in bench/out/zoo_<suite>.txt (one thread, beside other load: hf 24 s, segmentation
14 minutes, detection 3 minutes, timm 8 minutes, classification 90 minutes), e.g.
    python bench/zoo.py --suite all --out 'bench/out/zoo_{suite}.txt'
"""
import argparse, collections, copy, gc, json, re, sys, tempfile, time, traceback, warnings, torch, torchvision
from pathlib import Path
from typing import Callable, NamedTuple
from torch import nn
from fasterai_lr.core import LAYER_METHODS, output_tensors
from fasterai_lr.decompose import decompose_model
from fasterai_lr.export import to_onnx, onnx_error
try: from fasterai_lr.ranks import Budget
except ImportError: Budget = None

QUICK = ['resnet18', 'mobilenet_v3_small', 'efficientnet_b0', 'vit_b_16', 'convnext_tiny', 'regnet_x_400mf', 'squeezenet1_0', 'googlenet']
METHODS = ['tucker', 'cp', 'svd', 'spatial'] + (['budget'] if Budget else [])
SIZES = (64, 224, 299, 320)  # the smallest input each architecture takes (ViTs and MaxViT need 224, Inception 299, SSD300 320)
TOL = 1e-4
EXPECTED = (r"no nn\.Linear or nn\.Conv2d layer to decompose",   # GPT-2: its transformers Conv1D is no nn.Linear
            r"Budget\(params=[\d.]+\) cannot be met",           # most parameters in layers that are not walked (embeddings)
            r"float32 roundoff of the model itself")            # rank=full exact in float64: the float32 model is ill-conditioned

def n_params(m): return sum(p.numel() for p in m.parameters())

def size(name:str)->int:
    "Parameters of torchvision architecture `name`, from its weights' metadata (nothing downloaded or allocated; 0 without weights)"
    try: return next(iter(torchvision.models.get_model_weights(name))).meta['num_params']
    except Exception: return 0

def drawn(model:nn.Module)->nn.Module:
    """`model` in eval mode, its weights that the init left at zero (ViT's head) drawn at random, and its layer scales left at a tiny
    constant (ConvNeXt's 1e-6) set to 1: else outputs are 0, or blind to every residual branch, and comparisons see nothing"""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any(): p.normal_(0, 0.02)
            elif p.numel() > 1 and 0 < abs(v := float(p.flatten()[0])) <= 1e-4 and (p==v).all(): p.fill_(1.)
    return model.eval()

def build(name:str, **kw)->nn.Module:
    "torchvision architecture `name`, untrained (`kw`: weights_backbone=None, aux_loss=False, ...), zeros drawn, in eval mode"
    return drawn(torchvision.models.get_model(name, weights=None, **kw))

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

def decompose(model, method, **kw):
    if method=='budget': return decompose_model(model, 'tucker', rank=Budget(params=0.5).plan(model, 'tucker'), quiet=True)
    return decompose_model(model, method, quiet=True, **(kw or dict(keep=0.5)))

def skipped(report)->dict:
    "{reason: count} of the layers left as they are (numbers in the reasons replaced by #)"
    notes = report.loc[report['method'].isna(), 'note'].fillna('')
    return dict(collections.Counter(re.sub(r'\d+', '#', n) or '(no note)' for n in notes))

def not_walked(model:nn.Module)->dict:
    "{module class: parameters} of the weights (>= 2-D) held by modules that the walk does not take (no nn.Linear/nn.Conv2d)"
    c = collections.Counter()
    for m in model.modules():
        if isinstance(m, tuple(LAYER_METHODS)): continue
        c[type(m).__name__] += sum(p.numel() for p in m.parameters(recurse=False) if p.dim() > 1)
    return {k:v for k,v in c.most_common() if v}

def like(x:torch.Tensor, n:int=1)->torch.Tensor:
    "A random input shaped as `x` with batch `n` (token ids below x's largest + 1)"
    return torch.randint(0, int(x.max())+1, (n, *x.shape[1:])) if not x.is_floating_point() else torch.randn(n, *x.shape[1:])

def bn_stats(model:nn.Module, x:torch.Tensor, n:int=4)->nn.Module:
    """BatchNorm statistics of `model` set to its activations on `n` random batches like `x`: with an init's (0, 1) statistics
    activations can vanish layer after layer (deeplabv3_mobilenet_v3_large's backbone ends at ~1e-8) and the output is its last bias"""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns: return model
    model.eval()   # only the BatchNorms in train mode: the rest runs as in eval (Inception's aux head, dropout)
    for m in bns: m.reset_running_stats(); m.momentum = None; m.train()   # (momentum None: a cumulative average over the batches)
    with torch.no_grad():
        for _ in range(n): model(like(x, 4))
    for m in bns: m.momentum = 0.1
    return model.eval()

def sensitivity(model, x)->float:
    "How much `model`'s output moves with its input: relative change for another random input (~0: every comparison is blind)"
    return rel_error(run(model, x), run(model, like(x)))

def run(model, x):
    with torch.no_grad(): return model(x)

def rel_error(y, y2)->float:
    "Largest |y2-y| relative to the largest |y| over the output tensors (tensors, tuples or dicts of them): same shapes, finite"
    a,b = output_tensors(y),output_tensors(y2)
    shapes = lambda ts: [tuple(t.shape) for t in ts]
    if shapes(a)!=shapes(b): raise AssertionError(f"outputs {shapes(b)}, the model's {shapes(a)}")
    if not all(t.isfinite().all() for t in b): raise AssertionError("outputs not finite")
    return max(float((u-v).abs().max()/max(float(u.abs().max()), 1e-30)) for u,v in zip(a,b))

class Flat(nn.Module):
    "`model` with its outputs as a tuple of tensors (what ONNX exports, e.g. of a backbone's OrderedDict)"
    def __init__(self, model): super().__init__(); self.model = model
    def forward(self, x): return tuple(output_tensors(self.model(x)))

def onnx_check(model, x, dynamo:bool, tol:float=TOL)->str:
    "'ok (relative error)' or why not, for `model` exported on `x`"
    with tempfile.TemporaryDirectory() as d:
        err = onnx_error(to_onnx(Flat(model), x, f'{d}/m.onnx', dynamo=dynamo), Flat(model), x)
    if err > tol: raise AssertionError(f"onnxruntime differs from PyTorch by {err:.1e} (relative) > {tol:.0e}")
    return f"ok ({err:.0e})"

def arch_exports(model, x, dynamo:bool)->str:
    "'ok' if the undecomposed architecture exports to ONNX, or the exporter's error"
    try:
        with tempfile.TemporaryDirectory() as d: to_onnx(Flat(model), x, f'{d}/m.onnx', dynamo=dynamo)
        return 'ok'
    except Exception as e: return f"{type(e).__name__}: {str(e)[:120]}"

def attempt(errs:list, what:str, f:Callable):
    "f(), or None with what went wrong appended to `errs`"
    try: return f()
    except Exception as e:
        errs.append(f"{what}: {type(e).__name__}: {str(e)[:300]} @ {traceback.extract_tb(e.__traceback__)[-1].name}")

def row0(name, method, **kw)->dict:
    return dict(model=name, method=method, status='error', full=None, err=None, decomposed=0, of=0, skipped={}, params=0, params_after=0,
                onnx='-', error='', secs=0.) | kw

def full_error(model, method:str, x, y=None)->float:
    "Relative output error of `model` decomposed by `method` at rank='full'"
    return rel_error(run(model, x) if y is None else y, run(decompose(model, method, rank='full')[0], x))

def in_float64(model, method:str, x)->str:
    "Why rank='full' misses in float32: the same in float64 (exact to ~1e-12 unless the decomposition is wrong)"
    try: e = full_error(copy.deepcopy(model).double(), method, x.double() if x.is_floating_point() else x)
    except Exception as ex: return f" (in float64: {type(ex).__name__}: {str(ex)[:100]})"
    return f" (in float64 {e:.0e}{': float32 roundoff of the model itself' if e < 1e-9 else ''})"

def zoo_row(name:str, method:str, model=None, x=None, onnx:bool=True, dynamo:bool=False, onnx_max:float=1e8, arch_onnx=None,
            full:bool=True, tol:float=TOL)->dict:
    "Decompose `model` (architecture `name`) by `method` at rank='full' and at keep=0.5, run both on `x`, export the second: what happened"
    row,errs,t = row0(name, method),[],time.perf_counter()
    if model is None: model = attempt(errs, 'build', lambda: build(name))
    if x is None and model is not None: x = attempt(errs, 'input', lambda: input_for(model))
    y = None if errs else attempt(errs, 'the original', lambda: run(model, x))
    if y is not None and full and method!='budget':   # a budget has no full rank
        row['full'] = attempt(errs, 'rank=full', lambda: full_error(model, method, x, y))
        if row['full'] is not None and row['full'] > tol:
            errs.append(f"rank=full: relative error {row['full']:.1e} > {tol:.0e}{in_float64(model, method, x)}")
    if y is not None and (r := attempt(errs, 'keep=0.5', lambda: decompose(model, method))):
        new,rep = r
        row.update(decomposed=int(rep['method'].notna().sum()), of=len(rep), skipped=skipped(rep), params=n_params(model),
                   params_after=n_params(new))
        row['err'] = attempt(errs, 'keep=0.5 forward', lambda: rel_error(y, run(new, x)))
        if not onnx: row['onnx'] = 'not asked'
        elif n_params(model) > onnx_max: row['onnx'] = f"skipped: {n_params(model)/1e6:.0f}M parameters > --onnx-max-params"
        elif arch_onnx not in (None, 'ok'): row['onnx'] = f"n/a: the architecture does not export ({arch_onnx})"
        elif (o := attempt(errs, 'onnx', lambda: onnx_check(new, x, dynamo))): row['onnx'] = o
        else: row['onnx'] = 'error'
        del new
    expected = errs and all(any(re.search(p, e) for p in EXPECTED) for e in errs)
    row.update(status='n/a' if expected else 'error' if errs else 'ok', error='; '.join(errs), secs=round(time.perf_counter()-t, 1))
    return row

def fmt(r:dict)->str:
    sk = '; '.join(f"{n}× {why}" for why,n in r['skipped'].items()) or '-'
    kept = f"{r['params_after']/r['params']:.0%}" if r['params'] else '-'
    e = lambda v: '-' if v is None else f"{v:.0e}"
    err = f"  | {'ERROR ' if r['status']=='error' else ''}{r['error']}" if r['error'] else ''
    return (f"{r['model']:37} {r['method']:8} {r['status']:6} {e(r['full']):>6} {e(r['err']):>6} {r['decomposed']:>4}/{r['of']:<4} "
            f"{kept:>5} {r['secs']:7.1f}s  onnx: {r['onnx']}  | skipped: {sk}{err}")

# ---- the suites: names (smallest first) and, for each, (model, input)

class Suite(NamedTuple):
    names: Callable   # args -> model names, smallest first
    make: Callable    # (name, args) -> (model in eval mode, its input)
    methods: str      # the default --methods
    quick: list = []  # --quick's models ([]: the 3 smallest)

def tv_names(module): return lambda a: sorted(torchvision.models.list_models(module=module), key=size)

def tv_make(**kw):
    def make(name, a): m = build(name, **kw); return m, input_for(m)
    return make

def seg_make(name, a):
    m = build(name, weights_backbone=None, aux_loss=False)
    return m, input_for(m)

def det_make(name, a):
    m = drawn(build(name, weights_backbone=None).backbone)   # the heads take image lists and targets: out of scope
    return m, input_for(m)

def timm_import(a):
    "timm, from sys.path or `a.timm_path`; None when it is missing"
    if a.timm_path and a.timm_path not in sys.path: sys.path.insert(0, a.timm_path)
    try: import timm; return timm
    except ImportError: return None

def timm_sizes(a)->dict:
    "{timm model: parameters}: read from `a.timm_sizes`, or counted on the meta device (every model, ~10 minutes) and written there"
    timm,p = timm_import(a),Path(a.timm_sizes)
    if p.exists() and (d := json.loads(p.read_text())).get('timm')==timm.__version__: return d['params']
    sizes = {}
    for n in timm.list_models():
        try:
            with torch.device('meta'): sizes[n] = n_params(timm.create_model(n, pretrained=False))
        except Exception as e: print(f"timm {n}: {type(e).__name__}: {e}"[:200])
    p.parent.mkdir(parents=True, exist_ok=True); p.write_text(json.dumps(dict(timm=timm.__version__, params=sizes), indent=0))
    return sizes

def timm_names(a)->list:
    "The smallest model of each timm module (family), test models left out, up to `a.timm_max_params` parameters"
    from timm.models._registry import _model_to_module
    fam = collections.defaultdict(list)
    for n,k in timm_sizes(a).items():
        if not n.startswith('test_'): fam[_model_to_module[n]].append((k, n))
    return [n for k,n in sorted(min(v) for v in fam.values()) if k <= a.timm_max_params]

def timm_make(name, a):
    timm = timm_import(a)
    m = drawn(timm.create_model(name, pretrained=False))
    return m, torch.randn(1, *(m.pretrained_cfg.get('input_size') or (3, 224, 224)))

class HF(nn.Module):
    "A Hugging Face model called on one tensor (`key`: input_ids or pixel_values; T5's decoder reads the same ids): its last_hidden_state"
    def __init__(self, model, key='input_ids', decoder=False): super().__init__(); self.model,self.key,self.decoder = model,key,decoder
    def forward(self, x): return self.model(**{self.key: x}, **(dict(decoder_input_ids=x) if self.decoder else {}))[0]

L,D,H,V = 2,64,4,1000   # layers, hidden size, heads, vocabulary
HF_CONFIGS = dict(bert=('BertConfig', dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=2*D)),
                  distilbert=('DistilBertConfig', dict(dim=D, n_layers=L, n_heads=H, hidden_dim=2*D)),
                  roberta=('RobertaConfig', dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=2*D)),
                  gpt2=('GPT2Config', dict(n_embd=D, n_layer=L, n_head=H, bos_token_id=V-1, eos_token_id=V-1)),
                  vit=('ViTConfig', dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=2*D, image_size=32,
                                         patch_size=8)),
                  t5=('T5Config', dict(d_model=D, d_kv=D//H, d_ff=2*D, num_layers=L, num_heads=H)))

def hf_make(name, a):
    import transformers
    cls,kw = HF_CONFIGS[name]
    model = transformers.AutoModel.from_config(getattr(transformers, cls)(**kw, **({} if name=='vit' else dict(vocab_size=V)))).eval()
    if name=='vit': return drawn(HF(model, 'pixel_values')), torch.randn(1, 3, 32, 32)
    return drawn(HF(model, decoder=name=='t5')), torch.randint(0, V, (1, 16))

SUITES = dict(classification=Suite(tv_names(torchvision.models), tv_make(), 'tucker,svd', QUICK),
              segmentation=Suite(tv_names(torchvision.models.segmentation), seg_make, ','.join(METHODS)),
              detection=Suite(tv_names(torchvision.models.detection), det_make, 'tucker,svd'),
              timm=Suite(timm_names, timm_make, 'tucker,svd'),
              hf=Suite(lambda a: list(HF_CONFIGS), hf_make, ','.join(METHODS), list(HF_CONFIGS)))

# ---- a suite's rows and its summary

def summary(rows:list, suite:str='', secs:float=0.)->str:
    "One line of counts for the suite, then every failure named"
    rs,full = [r for r in rows if r['method']!='-'],[r for r in rows if r['method'] not in ('-', 'budget') and r['status']!='skip']
    tried = [r for r in rs if r['onnx'].startswith(('ok', 'error'))]
    na = sorted({r['model'] for r in rs if r['onnx'].startswith('n/a')})
    n = lambda f, rs=rows: sum(map(f, rs))
    lines = [f"SUMMARY {suite}: {len({r['model'] for r in rows})} models, {len(rs)} rows; "
             f"full-rank exact {n(lambda r: r['full'] is not None and r['full'] <= TOL, full)}/{len(full)}; "
             f"keep=0.5 ok {n(lambda r: r['err'] is not None, rs)}/{n(lambda r: r['status']!='skip', rs)}; "
             f"ONNX ok {n(lambda r: r['onnx'].startswith('ok'), tried)}/{len(tried)} ({len(na)} architectures do not export); "
             f"{n(lambda r: r['status']=='error')} errors; {n(lambda r: r['status']=='n/a')} expected failures; "
             f"{n(lambda r: r['status']=='skip')} skipped by option; {secs:.0f} s"]
    lines += [f"  ERROR {r['model']} {r['method']}: {r['error']}" for r in rows if r['status']=='error']
    lines += [f"  EXPECTED {r['model']} {r['method']}: {r['error']}" for r in rows if r['status']=='n/a']
    lines += [f"  NO ONNX {m}: {next(r['onnx'] for r in rs if r['model']==m).split(' export (', 1)[1][:-1]}" for m in na]
    return '\n'.join(lines)

def model_rows(name:str, model, x, methods:list, a, say)->list:
    "The rows of one model: a line '#' of its size and unwalked weights, then one row per method"
    arch = arch_exports(model, x, a.dynamo) if not a.no_onnx and n_params(model) <= a.onnx_max_params else None
    nw = ', '.join(f"{k} {v/1e6:.3g}M ({v/n_params(model):.0%})" for k,v in not_walked(model).items()) or '-'
    sens = sensitivity(model, x)
    say(f"# {name}: {n_params(model)/1e6:.3g}M parameters, input {tuple(x.shape)}, output change for another input {sens:.0e}"
        f"{' (BLIND: the output hardly depends on the input)' if sens < 1e-3 else ''}; not walked: {nw}")
    rows = []
    for m in methods:
        if m=='cp' and a.cp_max_params and n_params(model) > a.cp_max_params:
            r = row0(name, m, status='skip', params=n_params(model),
                     error=f"skipped: {n_params(model)/1e6:.0f}M parameters > --cp-max-params")
        else: r = zoo_row(name, m, model, x, not a.no_onnx, a.dynamo, a.onnx_max_params, arch)
        rows.append(r); say(fmt(r))
    return rows

def run_suite(suite:str, a, say)->list:
    "Every model of `suite` (or `a.models`) through `a.methods` (or the suite's), smallest first; then its summary"
    s,t = SUITES[suite],time.perf_counter()
    if suite=='timm' and timm_import(a) is None:
        say(f"SUMMARY timm: skipped: timm is not installed (not importable, nor in --timm-path {a.timm_path}); install it with "
            f"`python -m pip install --target {a.timm_path or '/tmp/timm_pkg'} timm --no-deps`"); return []
    names = a.models.split(',') if a.models else (s.quick or s.names(a)[:3]) if a.quick else s.names(a)
    methods = (a.methods or s.methods).split(',')
    if bad := [m for m in methods if m not in METHODS]: sys.exit(f"--methods: unknown {bad}; pass some of {','.join(METHODS)}")
    say(f"suite {suite}: {len(names)} models; torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads; methods {methods}; ONNX {'off' if a.no_onnx else 'dynamo' if a.dynamo else 'TorchScript'}")
    say(f"{'model':37} {'method':8} {'status':6} {'full':>6} {'keep':>6} {'decomposed':>9} {'kept':>5} {'time':>8}")
    rows = []
    for name in names:
        try: model,x = s.make(name, a); bn_stats(model, x)
        except Exception as e:
            rows.append(r := row0(name, '-', error=f"building or running the original: {type(e).__name__}: {str(e)[:300]}"))
            say(fmt(r)); continue
        rows += model_rows(name, model, x, methods, a, say)
        del model; gc.collect()
    say(summary(rows, suite, time.perf_counter()-t))
    return rows

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--suite', default='classification', choices=[*SUITES, 'all'])
    p.add_argument('--quick', action='store_true', help=f"classification: only {', '.join(QUICK)}; other suites: their 3 smallest models")
    p.add_argument('--models', help="comma-separated model names of the suite (default: all)")
    p.add_argument('--methods', help=f"comma-separated, from {','.join(METHODS)} "
                                     "(default: tucker,svd for classification, detection, timm; all for segmentation, hf)")
    p.add_argument('--no-onnx', action='store_true', help='skip the ONNX export')
    p.add_argument('--dynamo', action='store_true', help='use the torch.export-based ONNX exporter (needs onnxscript; slower)')
    p.add_argument('--onnx-max-params', type=float, default=1e8, help='export only models with at most this many parameters')
    p.add_argument('--cp-max-params', type=float, help='run CP only on models with at most this many parameters')
    p.add_argument('--timm-path', default='/tmp/timm_pkg', help='a folder holding timm (pip install --target), put on sys.path')
    p.add_argument('--timm-max-params', type=float, default=20e6, help="timm: families whose smallest model has at most this many params")
    p.add_argument('--timm-sizes', default=str(Path(__file__).parent/'out'/'timm_params.json'), help="the cache of timm's parameter counts")
    p.add_argument('--out', help="also write the rows and the summary to this file ('{suite}' in it: one file per suite)")
    p.add_argument('--threads', type=int, default=1, help='torch threads (more than the free cores makes every op wait)')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads); warnings.filterwarnings('ignore')   # tracer and deprecation warnings: the rows say what matters
    if a.methods and 'budget' in a.methods and Budget is None: sys.exit("--methods budget needs fasterai_lr.ranks.Budget")
    rows = []
    for suite in SUITES if a.suite=='all' else [a.suite]:
        path = a.out and Path(a.out.format(suite=suite))
        if path: path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, 'a' if path and a.suite=='all' and '{suite}' not in a.out else 'w') if path else open('/dev/null', 'w') as out:
            def say(s): print(s, flush=True); out.write(s+'\n'); out.flush()
            rows += run_suite(suite, a, say)
    return rows

if __name__=='__main__': main()
