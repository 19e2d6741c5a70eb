"""Data-aware vs weight-only decomposition, before any fine-tuning, on a CNN trained here on scikit-learn's digits.

Every conv with k>1 and the hidden Linear are compressed to 25% and to 10% of their parameters; the table gives the
relative error of the logits on the test split and the accuracy, for each method weight-only, data-aware
(`Calibration`), data-aware sequential, the best data-aware option (best method per layer, sequential, and a global
allocation of the same total budget), and the fasterai package's Tucker and SVD (its wheel, with einops, looked for
on sys.path or in --fasterai DIR: `pip download --no-deps fasterai==0.4.1 einops -d DIR`).
Run: python bench/data_aware.py [--fasterai /tmp/fa] [--resnet50]   (--resnet50: time and peak memory of calibrating
torchvision's resnet50 on 256 images of 224×224)."""
import argparse, copy, glob, resource, sys, time, torch, torch.nn.functional as F
from torch import nn
from sklearn.datasets import load_digits
from fasterai_lr.all import *
from fasterai_lr.calibrate import *

def digits_net():
    return nn.Sequential(nn.Upsample(scale_factor=2, mode='bilinear'),
                         nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64*4*4, 128), nn.ReLU(), nn.Linear(128, 10))

def digits_data(seed=0):
    X,y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8)/16
    y = torch.tensor(y)
    p = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n = int(0.8*len(X))
    return (X[p[:n]], y[p[:n]]), (X[p[n:]], y[p[n:]])

def train(model, X, y, epochs=15, bs=64, lr=2e-3):
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs*((len(X)+bs-1)//bs))
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(X), generator=g).split(bs):
            loss = F.cross_entropy(model(X[i]), y[i])
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    return model.eval()

@torch.no_grad()
def evaluate(model, dense, X, y):
    "(relative logit error against the dense model, accuracy)"
    z,z0 = model(X), dense(X)
    return ((z-z0).norm()/z0.norm()).item(), (z.argmax(1)==y).float().mean().item()

def targets(model):
    "Names of the layers to compress: convs with k>1 and the hidden Linears (all but the last)"
    lins = [n for n,m in model.named_modules() if isinstance(m, nn.Linear)][:-1]
    return [n for n,m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size!=(1,1)] + lins

def layer_method(m, meth): return 'svd' if isinstance(m, nn.Linear) else meth

def weight_only(model, names, meth, keep):
    new = copy.deepcopy(model)
    for n in names:
        m = new.get_submodule(n); me = layer_method(m, meth)
        new.set_submodule(n, (linear_svd if me=='svd' and isinstance(m, nn.Linear) else BUILDERS[me])(m, layer_rank(kernel(m), me, 'keep', keep)))
    return new

def data_aware(model, names, plan, data, sequential=False, **kw):
    "Decompose `names` by `plan` {name: (method, rank)} with `Calibration`, in forward order"
    new = copy.deepcopy(model)
    cal = Calibration(data, sequential=sequential, **kw).prepare(new, names)
    for n in names:
        meth,r = plan[n]
        new.set_submodule(n, cal.build(n, new.get_submodule(n), meth, r))
    return new

def uniform_plan(model, names, meth, keep):
    return {n: (layer_method(m, meth), layer_rank(kernel(m), layer_method(m, meth), 'keep', keep)) for n in names for m in [model.get_submodule(n)]}

@torch.no_grad()
def layer_inputs(model, names, X):
    got,hooks = {},[model.get_submodule(n).register_forward_hook(lambda m,i,o,n=n: got.__setitem__(n, i[0])) for n in names]
    model(X)
    for h in hooks: h.remove()
    return got

def params(m): return sum(p.numel() for p in m.parameters())

@torch.no_grad()
def best_plan(model, names, data, keep, X, global_budget=False, **kw):
    """Per layer, the data-aware method (and with `global_budget` the rank) with the lowest output error on the calibration
    inputs `X`; globally: the (method, rank) per layer minimising the sum of squared relative layer errors under the total budget"""
    cal = Calibration(data, **kw).prepare(copy.deepcopy(model), names)
    xs = layer_inputs(model, names, X)
    cands = {}
    for n in names:
        m = model.get_submodule(n); y = m(xs[n]); p0 = params(m)
        cands[n] = []
        for meth in (['svd'] if isinstance(m, nn.Linear) else ['svd','spatial','tucker','cp']):
            full = full_ranks(kernel(m).shape)[meth]
            rs = ([layer_rank(kernel(m), meth, 'keep', k) for k in (0.03,0.05,0.08,0.12,0.18,0.25,0.35,0.5)] if global_budget
                  else [layer_rank(kernel(m), meth, 'keep', keep)])
            for r in dict.fromkeys(rs):
                if (r if meth!='tucker' else r[0]) > (full if meth!='tucker' else full[0]): continue
                blk = cal.build(n, m, meth, r)
                cands[n].append(((blk(xs[n])-y).norm().item()**2/y.norm().item()**2, params(blk), meth, r, p0))
    if not global_budget: return {n: min(c)[2:4] for n,c in cands.items()}
    budget = keep*sum(c[0][4] for c in cands.values())
    # greedy on the convex hull: start from the smallest candidate per layer, buy the best error drop per parameter
    pick = {n: min(c, key=lambda t: t[1]) for n,c in cands.items()}
    while True:
        used = sum(t[1] for t in pick.values())
        moves = [((pick[n][0]-t[0])/(t[1]-pick[n][1]), n, t) for n,c in cands.items() for t in c
                 if t[1] > pick[n][1] and t[0] < pick[n][0] and used-pick[n][1]+t[1] <= budget]
        if not moves: break
        _,n,t = max(moves, key=lambda m: m[0]); pick[n] = t
    return {n: t[2:4] for n,t in pick.items()}

def fasterai_column(model, names, keep, meth):
    "The fasterai package's Conv_Decomposer(method) per conv and its FC SVD, at the largest rank within `keep` of the parameters"
    from fasterai.misc.conv_decomposer import Conv_Decomposer as FConv
    from fasterai.misc.fc_decomposer import FC_Decomposer as FFC
    new = copy.deepcopy(model)
    for n in names:
        m = new.get_submodule(n); p0 = params(m)
        f = (lambda pr: FFC().SVD(m, pr)) if isinstance(m, nn.Linear) else (lambda pr: getattr(FConv(), meth)(m, pr))
        for pr in [i/200 for i in range(200)]:                 # fasterai takes the fraction of the rank to remove
            blk = f(pr)
            if params(blk) <= keep*p0: break
        new.set_submodule(n, blk)
    return new

def find_fasterai(path):
    for p in ([path] if path else []) + ['/tmp/fa']: sys.path[:0] = glob.glob(f'{p}/*.whl') + [p]
    try: import fasterai.misc.conv_decomposer; return True
    except ImportError as e: print(f"(fasterai not importable: {e}; its columns are skipped)"); return False

def calibrate_resnet50(n_images=256, bs=32, max_rows=1024, methods=('tucker',)):
    "Time and peak RSS of streaming the statistics of torchvision's resnet50 (weights=None) on `n_images` random 224×224 images"
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    xs = [torch.randn(bs, 3, 224, 224) for _ in range(n_images//bs)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20
    t = time.perf_counter()
    with torch.no_grad():
        for x in xs: model(x)
    t_fwd = time.perf_counter()-t
    names = [n for n,m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for meth in methods:
        cal = Calibration(xs, n_batches=len(xs), max_rows=max_rows).prepare(model, names)
        t = time.perf_counter()
        cal.collect(meth)
        dt = time.perf_counter()-t
        stat_mb = sum(sum(v.numel()*8 for v in (s.G, s.C, s.Cin, s.Cout) if v is not None) for s in cal.stats.values())/2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20
        print(f"resnet50, {n_images} images 224×224, max_rows={max_rows}, statistics for {meth:6}: {dt:5.1f} s (a plain forward of the same data: {t_fwd:.1f} s), "
              f"Grams {stat_mb:,.0f} MiB, peak RSS {rss:.2f} GiB (+{rss-rss0:.2f} GiB over the model and data), {torch.get_num_threads()} threads")
        del cal

if __name__=='__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--fasterai', default=None, help='folder with the fasterai (and einops) wheels')
    ap.add_argument('--resnet50', action='store_true', help='also time the calibration of resnet50')
    ap.add_argument('--n-batches', type=int, default=8)
    ap.add_argument('--resnet50-methods', default='tucker', help="methods whose statistics to time on resnet50, e.g. 'tucker,svd'")
    a = ap.parse_args()
    torch.manual_seed(0)
    (Xtr,ytr),(Xte,yte) = digits_data()
    t = time.perf_counter()
    dense = train(digits_net(), Xtr, ytr)
    _,acc0 = evaluate(dense, dense, Xte, yte)
    names = targets(dense)
    print(f"digits CNN: {params(dense):,} parameters, test accuracy {acc0:.4f}, trained in {time.perf_counter()-t:.1f} s; compressing {names}", flush=True)
    data = list(zip(Xtr.split(64), ytr.split(64)))
    has_fa = find_fasterai(a.fasterai)
    rows = {}
    for keep in (0.25, 0.10):
        col = {}
        for meth in ('svd','spatial','tucker','cp'):
            col[f'weight {meth}'] = weight_only(dense, names, meth, keep)
            plan = uniform_plan(dense, names, meth, keep)
            col[f'data {meth}'] = data_aware(dense, names, plan, data, n_batches=a.n_batches)
            col[f'data {meth} seq'] = data_aware(dense, names, plan, data, sequential=True, n_batches=a.n_batches)
            print(f"keep {keep:.0%} {meth}: done", flush=True)
        for glob_ in (False, True):
            plan = best_plan(dense, names, data, keep, torch.cat([x for x,_ in data[:a.n_batches]]), glob_, n_batches=a.n_batches)
            tag = 'best global seq' if glob_ else 'best per layer seq'
            col[tag] = data_aware(dense, names, plan, data, sequential=True, n_batches=a.n_batches)
            print(f"keep {keep:.0%}, {tag}: " + ', '.join(f"{n}: {m} {r}" for n,(m,r) in plan.items()))
        if has_fa:
            for meth in ('Tucker','SVD'): col[f'fasterai {meth}'] = fasterai_column(dense, names, keep, meth)
        for k,m in col.items():
            kept = sum(params(m.get_submodule(n)) for n in names)/sum(params(dense.get_submodule(n)) for n in names)
            rows.setdefault(k, {})[keep] = (*evaluate(m, dense, Xte, yte), kept)
    print(f"\n{'':22}|{'keep 25%: logit err':>20}{'acc/dense':>10}{'params':>8} |{'keep 10%: logit err':>20}{'acc/dense':>10}{'params':>8}")
    for k,r in rows.items():
        print(f"{k:22}|" + ' |'.join(f"{r[kp][0]:20.3f}{r[kp][1]/acc0:10.3f}{r[kp][2]:8.1%}" for kp in (0.25, 0.10)))
    print("targets: 25%: logit err ≤ 0.15, acc/dense ≥ 0.99; 10%: ≤ 0.45, ≥ 0.97 ('params': kept share of the compressed layers' parameters)")
    if a.resnet50: calibrate_resnet50(methods=a.resnet50_methods.split(','))
