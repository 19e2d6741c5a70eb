"Decomposed models as first-class citizens: plans, save/load, ONNX, torch.export, low precision, DDP, the torchvision zoo"
import copy, importlib.util, json, os, socket, pytest, torch, torch.distributed as dist, torch.multiprocessing as mp
from pathlib import Path
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from fasterai_lr.layers import BUILDERS, Factorized, linear_svd
from fasterai_lr.decompose import decompose_model
from fasterai_lr.export import *

METHODS = ['tucker', 'cp', 'svd', 'spatial']

def cnn(): return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                nn.Conv2d(16, 24, (3,5), stride=2, padding=(1,2), bias=False), nn.ReLU(),   # non-square kernel, no bias
                                nn.Conv2d(24, 32, 3, padding=1, groups=4), nn.ReLU(),                        # grouped: ranks per group
                                nn.Conv2d(32, 32, 1), nn.Conv2d(32, 32, 3, padding=1, groups=32),            # 1×1 (SVD), depthwise (left)
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
def mlp(): return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
X = dict(cnn=lambda: torch.randn(2, 3, 12, 12), mlp=lambda: torch.randn(4, 20))
ARCH = dict(cnn=cnn, mlp=mlp)

def decomposed(arch, method='tucker', **kw):
    torch.manual_seed(0)
    return decompose_model(ARCH[arch]().eval(), method, quiet=True, **({'keep': 0.5, 'head': True} | kw))[0]   # the output Linear too: plans and exports cover it

def rel(a, b): return ((a-b).norm()/b.norm()).item()

# ---- plans

@pytest.mark.parametrize('arch,method', [('cnn', m) for m in METHODS] + [('mlp', 'svd')])
def test_plan_round_trip(arch, method):
    "plan → JSON → a fresh instance → load_state_dict: the same model, exactly"
    new = decomposed(arch, method)
    plan = json.loads(json.dumps(decomposition_plan(new)))
    again = apply_plan(ARCH[arch]().eval(), plan)
    again.load_state_dict(new.state_dict())
    x = X[arch]()
    with torch.no_grad(): assert torch.equal(again(x), new(x)), f"{arch}/{method}: outputs differ"
    assert decomposition_plan(again)==plan, f"{arch}/{method}: the plan of the rebuilt model differs"
    assert repr(again)==repr(new), f"{arch}/{method}: architectures differ"

@pytest.mark.parametrize('method', METHODS)
def test_plan_round_trip_calibrated(method):
    "Data-aware blocks (calib=) have the same structure: their plan and weights rebuild them exactly"
    from fasterai_lr.calibrate import Calibration
    new = decomposed('cnn', method, calib=Calibration([torch.randn(8, 3, 12, 12)]))
    again = apply_plan(cnn().eval(), json.loads(json.dumps(decomposition_plan(new))))
    again.load_state_dict(new.state_dict())
    x = X['cnn']()
    with torch.no_grad(): assert torch.equal(again(x), new(x)), f"calibrated {method}: outputs differ"

def test_plan_contents():
    "Ranks as the blocks hold them: Tucker a pair, CP an int; 1×1 by SVD whatever the method; grouped: per group; depthwise left out"
    p = {m: decomposition_plan(decomposed('cnn', m))['layers'] for m in METHODS}
    assert p['tucker']['0']['method']=='tucker' and isinstance(p['tucker']['0']['rank'], list) and len(p['tucker']['0']['rank'])==2, p['tucker']['0']
    assert isinstance(p['cp']['0']['rank'], int), p['cp']['0']
    for m in METHODS:
        assert p[m]['7']['method']=='svd', f"{m}: the 1×1 conv should be decomposed by SVD, the plan says {p[m]['7']}"
        assert '8' not in p[m], f"{m}: the depthwise conv should be left as it is"
        assert p[m]['11']=={'method': 'svd', 'rank': p[m]['11']['rank'], 'source': 'Linear(10, 32)'}, p[m]['11']
        assert p[m]['5']['source']=='Conv2d(32, 6, 3, 3)', f"{m}: grouped conv source {p[m]['5']}"
    blk = decomposed('cnn', 'svd')[5]
    assert blk[0].out_channels==4*blk.rank, f"grouped conv: the first factor has groups×rank channels, got {blk[0]}"

# A plan written by format version 1 (this literal must keep loading in later versions: do not edit it, add a new one)
PLAN_V1 = '''{"format": "fasterai_lr.plan", "version": 1, "layers": {
  "0":  {"method": "tucker",  "rank": [7, 2], "source": "Conv2d(16, 3, 3, 3)"},
  "3":  {"method": "cp",      "rank": 9,      "source": "Conv2d(24, 16, 3, 5)"},
  "5":  {"method": "spatial", "rank": 4,      "source": "Conv2d(32, 6, 3, 3)"},
  "7":  {"method": "svd",     "rank": 8,      "source": "Conv2d(32, 32, 1, 1)"},
  "11": {"method": "svd",     "rank": 3,      "source": "Linear(10, 32)"}}}'''

def test_plan_v1_literal_loads():
    plan = json.loads(PLAN_V1)
    net = cnn().eval()
    new = apply_plan(net, plan)
    assert decomposition_plan(new)==plan, "the rebuilt model's plan differs from the literal"
    assert [tuple(new[0][i].weight.shape) for i in range(3)]==[(2, 3, 1, 1), (7, 2, 3, 3), (16, 7, 1, 1)], "Tucker (7, 2) factors"
    assert new[3][1].groups==9 and tuple(new[5][0].weight.shape)==(16, 6, 3, 1), "CP depthwise factors; spatial per-group rank"
    # the builders' blocks at the planned ranks load into it
    src = copy.deepcopy(net)
    for n,(m,r) in check_plan(plan).items():
        layer = src.get_submodule(n)
        src.set_submodule(n, linear_svd(layer, r) if isinstance(layer, nn.Linear) else BUILDERS[m](layer, r))
    new.load_state_dict(src.state_dict())
    x = X['cnn']()
    with torch.no_grad(): assert torch.equal(new(x), src(x))

def test_plan_nested():
    "A block whose factor was decomposed again (a plan lists the outer block first) round-trips too"
    net = cnn().eval()
    new = decomposed('cnn', 'tucker')
    new[0].set_submodule('1', BUILDERS['svd'](new[0][1], 2))
    plan = decomposition_plan(new)
    assert list(plan['layers'])[:2]==['0', '0.1'], list(plan['layers'])
    again = apply_plan(net, json.loads(json.dumps(plan)))
    again.load_state_dict(new.state_dict())
    x = X['cnn']()
    with torch.no_grad(): assert torch.equal(again(x), new(x))

# ---- saving and loading

@pytest.mark.parametrize('how', ['instance', 'function', 'meta'])
def test_save_load_decomposed(tmp_path, how):
    new = decomposed('cnn', 'cp')
    save_decomposed(new, tmp_path/'m.pth')
    if how=='meta':
        with torch.device('meta'): arch = cnn()
    else: arch = cnn() if how=='instance' else cnn
    back = load_decomposed(arch, tmp_path/'m.pth').eval()
    x = X['cnn']()
    with torch.no_grad(): assert torch.equal(back(x), new(x)), how
    assert all(torch.equal(v, new.state_dict()[k]) for k,v in back.state_dict().items()), f"{how}: buffers or weights differ"
    assert torch.load(tmp_path/'m.pth', weights_only=True)['plan']==decomposition_plan(new), "the file holds the plan, safely loadable"

def test_torch_save_whole_model(tmp_path):
    new = decomposed('cnn', 'tucker')
    torch.save(new, tmp_path/'m.pt')
    back = torch.load(tmp_path/'m.pt', weights_only=False)
    x = X['cnn']()
    with torch.no_grad(): assert torch.equal(back(x), new(x))
    assert decomposition_plan(back)==decomposition_plan(new)

# ---- export

def _exporters():
    return [False] + ([True] if importlib.util.find_spec('onnxscript') else [pytest.param(True, marks=pytest.mark.skip(reason='onnxscript not installed'))])

@pytest.mark.parametrize('arch,method', [('cnn', m) for m in METHODS] + [('mlp', 'svd')])
def test_onnx_legacy(tmp_path, arch, method):
    new,x = decomposed(arch, method), X[arch]()
    err = onnx_error(to_onnx(new, x, tmp_path/'m.onnx', dynamo=False), new, x)
    assert err < 1e-4, f"{arch}/{method}: onnxruntime differs from PyTorch by {err:.1e} (relative)"

def test_onnx_check_can_fail(tmp_path):
    "onnx_error sees a file that is not the model, and to_onnx gives the model back in the mode it had"
    new,x = decomposed('cnn', 'svd').train(), X['cnn']()
    path = to_onnx(new, x, tmp_path/'m.onnx', dynamo=False)
    assert new.training, "to_onnx should restore training mode"
    with torch.no_grad(): new[11][1].weight.mul_(1.1)
    assert onnx_error(path, new, x) > 1e-3, "a 10% change of the head's factor went unseen"

@pytest.mark.parametrize('arch,method', [('cnn', 'cp'), ('mlp', 'svd')])
def test_onnx_dynamo(tmp_path, arch, method):
    "The torch.export-based exporter (torch.onnx.export's default since 2.9) needs onnxscript"
    pytest.importorskip('onnxscript')
    new,x = decomposed(arch, method), X[arch]()
    err = onnx_error(to_onnx(new, x, tmp_path/'m.onnx', dynamo=True), new, x)
    assert err < 1e-4, f"{arch}/{method}: onnxruntime differs from PyTorch by {err:.1e} (relative)"

@pytest.mark.parametrize('arch,method', [('cnn', m) for m in METHODS] + [('mlp', 'svd')])
def test_torch_export(arch, method):
    new,x = decomposed(arch, method), X[arch]()
    ep = torch.export.export(new, (x,))
    with torch.no_grad(): y,ref = ep.module()(x), new(x)
    assert rel(y, ref) < 1e-6, f"{arch}/{method}: torch.export output differs by {rel(y, ref):.1e}"
    assert new.training is False and any(isinstance(m, Factorized) for m in new.modules())

# ---- low precision: factorized in float64/float32, stored in the model's dtype

@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['f16', 'bf16'])
def test_low_precision_model(method, dtype):
    torch.manual_seed(0)
    net = cnn().eval().to(dtype)
    low = decompose_model(net, method, keep=0.5, head=True, quiet=True)[0]
    ref = decompose_model(copy.deepcopy(net).double(), method, keep=0.5, head=True, quiet=True)[0]   # same weights, factorized in float64 and kept there
    assert {p.dtype for p in low.parameters()}=={dtype}, f"{method}/{dtype}: parameters {({p.dtype for p in low.parameters()})}"
    for (k,a),b in zip(low.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b.to(dtype)), f"{method}/{dtype}: {k} is not the high-precision factor rounded once to {dtype}"
    x = X['cnn']()
    with torch.no_grad(): y,y64 = low(x.to(dtype)), ref(x.double())
    assert y.dtype==dtype and y.isfinite().all(), f"{method}/{dtype}: CPU forward gave {y.dtype}"
    e = rel(y.double(), y64)
    assert e < (2e-2 if dtype==torch.bfloat16 else 4e-3), f"{method}/{dtype}: output differs from float64 by {e:.1e}"

# ---- distributed: 2 CPU processes, gloo

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

class _Rewrap:
    "Test harness (fastai's DistributedTrainer needs `accelerate`): DDP around the model in training, the bare model for DecomposeCallback to swap"
    def make(self):
        from fastai.callback.core import Callback
        class Unwrap(Callback):
            order = -1  # before DecomposeCallback: it sees and swaps the bare model
            def before_batch(self):
                if isinstance(self.learn.model, DDP): self.learn.model = self.learn.model.module
        class Wrap(Callback):
            order = 11  # after it: DDP rebuilt around whatever model is there (it broadcasts rank 0's weights)
            def before_fit(self): self.learn.model = DDP(self.learn.model)
            def before_batch(self):
                if not isinstance(self.learn.model, DDP): self.learn.model = DDP(self.learn.model)
            def after_fit(self):
                if isinstance(self.learn.model, DDP): self.learn.model = self.learn.model.module
        return [Unwrap(), Wrap()]

def _learner(net, X, Y, cbs):
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.optimizer import SGD
    ds = list(zip(X, Y))
    learn = Learner(DataLoaders(DataLoader(ds, bs=8), DataLoader(ds[:8], bs=8)), net, loss_func=nn.CrossEntropyLoss(), opt_func=SGD, lr=0.05, cbs=cbs)
    learn.logger = lambda *a, **k: None
    return learn

# BatchNorm's running statistics are not compared: DDP broadcasts rank 0's buffers at the start of each forward, so after
# the last step each process holds its own update of them (SyncBatchNorm, which keeps them equal, needs a GPU)
DDP_METHODS = ['tucker', 'cp']   # eigh-based subspaces (as SVD and spatial SVD use) and ALS from a seeded start

def _params(model): return {k: p.detach().clone() for k,p in model.named_parameters()}

def _ddp_worker(rank, world, port, out):
    "Per process: decompose (same factors?), rebuild DDP, train; then DecomposeCallback under DDP"
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(1+rank)   # each process its own data
        X,Y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
        res = {}
        for m in DDP_METHODS:
            torch.manual_seed(0)                        # the same model everywhere
            net = cnn()
            new = decompose_model(net, m, keep=0.5, quiet=True)[0]
            res[m, 'factors'] = {k: v.clone() for k,v in new.state_dict().items()}
            model = DDP(new)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            for i in range(4):
                loss = nn.functional.cross_entropy(model(X[8*i:8*i+8]), Y[8*i:8*i+8])
                opt.zero_grad(); loss.backward(); opt.step()
            res[m, 'trained'] = _params(model.module)
        from fasterai_lr.callback import DecomposeCallback
        torch.manual_seed(0)
        learn = _learner(cnn(), X, Y, [DecomposeCallback(start_epoch=1, method='tucker', verbose=False), *_Rewrap().make()])
        learn.fit(2)
        res['callback', 'trained'] = _params(learn.model)
        res['callback', 'blocks'] = [n for n,b in learn.model.named_modules() if isinstance(b, Factorized)]
        torch.save(res, f'{out}/rank{rank}.pt')
    finally: dist.destroy_process_group()

def test_ddp_two_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0,r1 = [torch.load(tmp_path/f'rank{i}.pt', weights_only=False) for i in range(2)]
    for key in r0:
        if key[1]=='blocks': continue
        diff = [k for k in r0[key] if not torch.equal(r0[key][k], r1[key][k])]
        assert not diff, f"{key}: the two processes hold different {diff}"
    for m in DDP_METHODS:
        assert any(not torch.equal(r0[m,'factors'][k], p) for k,p in r0[m,'trained'].items()), f"{m}: training changed nothing"
    assert r0['callback','blocks'] and r0['callback','blocks']==r1['callback','blocks'], f"callback: blocks {r0['callback','blocks']} vs {r1['callback','blocks']}"

def test_ddp_callback_on_wrapped_model():
    "As fastai's DistributedTrainer leaves it: learn.model is a DDP for the whole fit (one process suffices to show it)"
    from fastai.callback.core import Callback
    from fasterai_lr.callback import DecomposeCallback
    class Wrap(Callback):
        order = 11
        def before_fit(self): self.learn.model = DDP(self.learn.model)
        def after_fit(self): self.learn.model = self.learn.model.module
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()))
    dist.init_process_group('gloo', rank=0, world_size=1)
    try:
        X,Y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
        learn = _learner(cnn(), X, Y, [DecomposeCallback(start_epoch=1, verbose=False), Wrap()])
        learn.fit(2)
        assert any(isinstance(b, Factorized) for b in learn.model.modules())
    finally: dist.destroy_process_group()

# ---- the zoo (bench/zoo.py) on a handful of representative architectures

def _zoo():
    spec = importlib.util.spec_from_file_location('zoo', Path(__file__).parents[1]/'bench'/'zoo.py')
    zoo = importlib.util.module_from_spec(spec); spec.loader.exec_module(zoo)
    return zoo

@pytest.mark.slow
@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v3_small', 'efficientnet_b0', 'vit_b_16', 'convnext_tiny', 'regnet_x_400mf', 'squeezenet1_0', 'googlenet'])
def test_zoo(name):
    zoo = _zoo()
    model = zoo.build(name); x = zoo.input_for(model)
    arch = zoo.arch_exports(model, x, dynamo=False)
    for m in zoo.METHODS:
        r = zoo.zoo_row(name, m, model, x, onnx=True, arch_onnx=arch)
        assert r['status']=='ok', f"{name}/{m}: {r['error']}"
        assert r['decomposed'] > 0 and r['params_after'] < r['params'], f"{name}/{m}: {r['decomposed']} layers decomposed, {r['params_after']}/{r['params']} parameters"
        assert r['onnx'].startswith('ok'), f"{name}/{m}: onnx {r['onnx']}"   # every one of these architectures exports
        if name=='vit_b_16': assert any('MultiheadAttention' in k for k in r['skipped']), f"vit_b_16: out_proj should be skipped, got {r['skipped']}"

# ---- a parent that reads its child's weight directly (torchvision's Swin attention, like nn.MultiheadAttention)

class _ReadsWeight(nn.Module):
    "As torchvision's ShiftedWindowAttention: F.linear(x, self.qkv.weight, self.qkv.bias) instead of self.qkv(x)"
    def __init__(self): super().__init__(); self.qkv,self.out = nn.Linear(32, 96), nn.Linear(96, 8)
    def forward(self, x): return self.out(nn.functional.linear(x, self.qkv.weight, self.qkv.bias))

def test_parent_reading_weight_directly_is_skipped():
    new,rep = decompose_model(nn.Sequential(_ReadsWeight()), 'svd', rank=4, head=True, quiet=True)   # (0.out is the output layer)
    new(torch.randn(2, 32))
    row = rep.set_index('layer').loc['0.qkv']
    assert row['method'] is None or row['method']!=row['method'], f"0.qkv was decomposed: {row.to_dict()}"
    assert row['note']=='read directly by _ReadsWeight.forward', row['note']
    assert rep.set_index('layer').loc['0.out', 'method']=='svd', rep
