"Dtypes and training state: factors come in the layer's dtype and follow its requires_grad; decompose never changes its input"
import copy, pytest, torch
from torch import nn
from fasterai_lr.layers import Factorized
from fasterai_lr.decompose import FC_Decomposer, Conv_Decomposer, decompose_model

def rel(y, ref)->float: return ((y.double()-ref.double()).norm()/ref.double().norm()).item()

# (in, out, kernel, settings): plain, grouped strided reflect-padded non-square, dilated 'same'
CONVS = [(8, 12, 3, dict(padding=1)), (8, 8, (3,5), dict(stride=2, padding=(1,2), groups=2, padding_mode='reflect')),
         (6, 10, 3, dict(padding='same', dilation=2, padding_mode='replicate'))]
def conv_id(c): return f"{c[0]}to{c[1]}-k{c[2]}-" + '-'.join(f"{k}={v}" for k,v in c[3].items())
METHODS = ['Tucker', 'CP', 'SVD', 'Spatial', 'Linear']

def make(method, c, dtype=torch.float32):
    "A layer of `method`'s kind (a Conv2d from `c`, or a Linear), its input and the call that decomposes it"
    if method=='Linear':
        return nn.Linear(c[0]*3, c[1], dtype=dtype), torch.randn(2, 5, c[0]*3, dtype=dtype), FC_Decomposer().SVD
    cin,cout,k,kw = c
    return nn.Conv2d(cin, cout, k, dtype=dtype, **kw), torch.randn(2, cin, 9, 11, dtype=dtype), getattr(Conv_Decomposer(), method)

def as_dtype(layer, dtype): return copy.deepcopy(layer).to(dtype)

@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('c', CONVS, ids=[conv_id(c) for c in CONVS])
def test_float64_exact(c, method):
    layer,x,f = make(method, c, torch.float64)
    blk = f(layer, rank='full')
    dts = {p.dtype for p in blk.parameters()}
    assert dts=={torch.float64}, f"{method} on float64 {conv_id(c)}: factor dtypes {dts}"
    with torch.no_grad(): e = rel(blk(x), layer(x))
    assert e <= 1e-12, f"{method} at rank='full' on float64 {conv_id(c)}: relative error {e:.2e} > 1e-12"

LOW = [torch.float16, torch.bfloat16]
def tol(dtype): return 3*torch.finfo(dtype).eps   # a few roundings of the dtype (measured ≤ 1.4 eps)

@pytest.mark.parametrize('dtype', LOW, ids=['f16', 'bf16'])
@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('c', CONVS, ids=[conv_id(c) for c in CONVS])
def test_low_precision_full_rank(c, method, dtype):
    "At full rank, the block in fp16/bf16 is as close to the float64 layer as the dtype allows"
    layer,x,f = make(method, c, dtype)
    blk = f(layer, rank='full')
    dts = {p.dtype for p in blk.parameters()}
    assert dts=={dtype}, f"{method} on {dtype} {conv_id(c)}: factor dtypes {dts}"
    with torch.no_grad(): y,ref = blk(x),as_dtype(layer, torch.float64)(x.double())
    assert y.dtype==dtype, f"{method} on {dtype}: output dtype {y.dtype}"
    e = rel(y, ref)
    assert e <= tol(dtype), f"{method} at rank='full' on {dtype} {conv_id(c)}: relative error {e:.2e} > {tol(dtype):.1e}"

@pytest.mark.parametrize('dtype', LOW, ids=['f16', 'bf16'])
@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('c', CONVS[:2], ids=[conv_id(c) for c in CONVS[:2]])
def test_low_precision_truncated(c, method, dtype):
    "Below full rank, the fp16/bf16 block is the float32 block of the same weights, rounded to the dtype"
    layer,x,f = make(method, c, dtype)
    blk = f(layer, keep=0.5)
    ref = f(as_dtype(layer, torch.float32), rank=blk.rank)
    assert {p.dtype for p in blk.parameters()}=={dtype}, f"{method} keep=0.5 on {dtype}: factor dtypes {[p.dtype for p in blk.parameters()]}"
    with torch.no_grad(): e = rel(blk(x), ref(x.float()))
    assert e <= tol(dtype), f"{method} rank {blk.rank} on {dtype} {conv_id(c)}: relative error to the float32 block {e:.2e} > {tol(dtype):.1e}"

@pytest.mark.parametrize('frozen', [False, True], ids=['trainable', 'frozen'])
@pytest.mark.parametrize('method', METHODS)
def test_requires_grad_follows_weight(method, frozen):
    layer,x,f = make(method, CONVS[1])
    layer.requires_grad_(not frozen)
    before = copy.deepcopy(layer.state_dict())
    for opts in (dict(rank='full'), dict(keep=0.3)):
        blk = f(layer, **opts)
        flags = {n: p.requires_grad for n,p in blk.named_parameters()}
        assert set(flags.values())=={not frozen}, f"{method} {opts} on a {'frozen' if frozen else 'trainable'} layer: factor requires_grad {flags}"
        if not frozen:   # the factors train: a backward pass reaches each of them, and not the original layer
            blk(x).square().mean().backward()
            assert all(p.grad is not None for p in blk.parameters()), f"{method} {opts}: a factor got no gradient"
            assert layer.weight.grad is None, f"{method} {opts}: the gradient reached the original layer"
    assert all(torch.equal(v, layer.state_dict()[k]) for k,v in before.items()), f"{method}: the per-layer call changed the layer"

def model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                         nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.Linear(6, 4))

@pytest.mark.parametrize('run', ['tucker', 'cp', 'svd', 'spatial', 'fc', 'decompose_model'])
def test_decompose_returns_copy(run):
    "decompose works on a deep copy: the model passed in keeps its modules, values and flags, and shares no storage with the result"
    net = model()
    net[0].requires_grad_(False)            # a frozen layer gives frozen factors
    ref = copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8)
    if run=='fc': new = FC_Decomposer().decompose(net, keep=0.5, quiet=True)
    elif run=='decompose_model': new,_ = decompose_model(net, 'tucker', keep=0.5, quiet=True)
    else: new = Conv_Decomposer().decompose(net, run, keep=0.5, quiet=True)
    assert any(isinstance(m, Factorized) for m in new.modules()), f"{run}: nothing was decomposed, the test would prove nothing"
    assert [type(m) for m in net.modules()]==[type(m) for m in ref.modules()], f"{run}: the modules of the model passed in changed"
    sd,rsd = net.state_dict(),ref.state_dict()
    assert all(torch.equal(sd[k], rsd[k]) for k in rsd), f"{run}: the state of the model passed in changed"
    assert [p.requires_grad for p in net.parameters()]==[p.requires_grad for p in ref.parameters()], f"{run}: requires_grad flags changed"
    ptrs = lambda m: {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()]}
    assert not ptrs(net) & ptrs(new), f"{run}: the decomposed model shares tensors with the model passed in"
    if isinstance(new[0], Factorized):
        assert not any(p.requires_grad for p in new[0].parameters()), f"{run}: the frozen layer 0 gave trainable factors"
    trainable = [m for m in new.modules() if isinstance(m, Factorized) and m is not new[0]]
    assert all(p.requires_grad for m in trainable for p in m.parameters()), f"{run}: a trainable layer gave frozen factors"
    # training the copy leaves the original alone
    new.train()
    opt = torch.optim.SGD([p for p in new.parameters() if p.requires_grad], lr=0.1)
    new(x).square().mean().backward(); opt.step()
    assert all(torch.equal(v, rsd[k]) for k,v in net.state_dict().items()), f"{run}: training the decomposed copy changed the original"

@pytest.mark.parametrize('dtype', [torch.float64, torch.float16, torch.bfloat16], ids=['f64', 'f16', 'bf16'])
def test_model_keeps_dtype(dtype):
    "Whole-model decomposition (with sample= counting) of a float64/fp16/bf16 model keeps every parameter in that dtype"
    net = model().to(dtype).eval()
    new,rep = decompose_model(net, 'tucker', rank='full', sample=(3, 8, 8), quiet=True)
    assert {p.dtype for p in new.parameters()}=={dtype}, f"{dtype} model: parameters of the result {({p.dtype for p in new.parameters()})}"
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    with torch.no_grad(): e = rel(new(x), as_dtype(net, torch.float64)(x.double()))
    assert e <= (1e-12 if dtype==torch.float64 else 4*tol(dtype)), f"{dtype} model at rank='full': relative error {e:.2e}"
