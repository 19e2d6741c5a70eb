"""A whole-model `Budget` against a uniform per-layer `keep`, at the same total parameters and at the same total MACs:
relative logit error on held-out data and accuracy before fine-tuning, weight-only and with a `Calibration` (data-aware), on a CNN trained on sklearn's digits and on
torchvision's resnet18 (weights=None: cost and error only). Run: python bench/budgets.py [--no-resnet] [--threads N]
One thread by default: on a shared 2-core machine more threads than free cores slow PyTorch down by an order of magnitude."""
import argparse, time, torch, torchvision, numpy as np
from torch import nn
from sklearn.datasets import load_digits
from fasterai_lr.decompose import decompose_model
from fasterai_lr.ranks import Budget, n_params, model_macs
from fasterai_lr.calibrate import Calibration

def digits_data(seed=0):
    X,y = load_digits(return_X_y=True)
    X = torch.tensor(X/16., dtype=torch.float32).reshape(-1, 1, 8, 8); y = torch.tensor(y)
    i = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    return (X[i[:1200]], y[i[:1200]]), (X[i[1200:]], y[i[1200:]])

def digits_cnn():
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))

def train(model, X, y, epochs=12, bs=64, lr=2e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=g).split(bs):
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad(); loss.backward(); opt.step()
    return model.eval()

@torch.no_grad()
def scores(model, X, y, ref):
    "(relative logit error against the original's logits `ref`, accuracy or None)"
    out = torch.cat([model(x) for x in X.split(64)])
    return ((out-ref).norm()/ref.norm()).item(), (None if y is None else (out.argmax(1)==y).float().mean().item())

def compare(name, model, method, keeps, sample, X, y, calib):
    "Rows: for each uniform keep, the budget matched to its parameters and to its MACs"
    P0, M0 = n_params(model), model_macs(model, sample)
    with torch.no_grad(): ref = torch.cat([model(x) for x in X.split(64)])
    rows = []
    for k in keeps:
        uni,_ = decompose_model(model, method, keep=k, quiet=True)
        fp, fm = n_params(uni)/P0, model_macs(uni, sample)/M0
        eu, au = scores(uni, X, y, ref)
        for by, f in (('params', fp), ('macs', fm)):
            for cal in (None, calib):
                b = Budget(**{by: f})
                new,_ = decompose_model(model, method, rank=b, sample=sample, quiet=True, calib=None if cal is None else Calibration(cal))
                got = n_params(new)/P0 if by=='params' else model_macs(new, sample)/M0
                eg, ag = scores(new, X, y, ref)
                rows.append((name, k, by, 'data' if cal is not None else 'weights', f, got, eu, eg, au, ag))
    return rows

def show(rows):
    pct = lambda v: '   -  ' if v is None else f"{v:6.1%}"
    print(f"{'model':10}{'keep':>5} {'matched':8}{'errors by':>10}{'asked':>8}{'got':>8} | {'rel. logit error':^17} | {'accuracy':^17}")
    print(f"{'':10}{'':>5} {'':8}{'':>10}{'':>8}{'':>8} | {'uniform':>8} {'budget':>8} | {'uniform':>8} {'budget':>8}")
    for n,k,by,w,f,got,eu,eg,au,ag in rows:
        print(f"{n:10}{k:5.2f} {by:8}{w:>10}{f:8.2%}{got:8.2%} | {eu:8.3f} {eg:8.3f} | {pct(au):>8} {pct(ag):>8}")

if __name__=='__main__':
    p = argparse.ArgumentParser(); p.add_argument('--no-resnet', action='store_true'); p.add_argument('--threads', type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 'weights': relative weight errors, weight-only factors; 'data': output errors on calibration batches, data-aware factors, the plan checked end to end")
    t = time.perf_counter()
    (Xt,yt),(Xv,yv) = digits_data()
    cnn = train(digits_cnn(), Xt, yt)
    print(f"digits CNN trained in {time.perf_counter()-t:.1f}s: test accuracy {scores(cnn, Xv, yv, cnn(Xv).detach())[1]:.1%}, {n_params(cnn):,} params, {model_macs(cnn, (1, 8, 8)):,} MACs")
    rows = compare('digits', cnn, 'tucker', (0.3, 0.5), (1, 8, 8), Xv, yv, list(Xt[:256].split(64)))
    print(f"digits done at {time.perf_counter()-t:.1f}s")
    if not a.no_resnet:
        r18 = torchvision.models.resnet18(weights=None).eval()
        x = torch.randn(16, 3, 112, 112, generator=torch.Generator().manual_seed(1))
        rows += compare('resnet18', r18, 'tucker', (0.5,), (3, 112, 112), x, None, [x[:4]])
    show(rows)
    print(f"total {time.perf_counter()-t:.1f}s")
