"`FactorizedMHA`: nn.MultiheadAttention's forward with factorized projections, exact at rank='full' over a grid of settings"
import copy, io, itertools, warnings, pytest, torch
from torch import nn
from fasterai_lr.core import DECOMPOSED, Factorized
from fasterai_lr.layers import FactorizedMHA, PROJECTIONS, attention_costs, attention_ranks, attention_svd, projections
from fasterai_lr.decompose import Attention_Decomposer

TOL = 1e-5   # float32: factors from a float64 SVD rounded once; the attention itself runs the same float32 kernels
SVD = Attention_Decomposer().SVD

def relerr(y, ref): return ((y-ref).norm()/ref.norm().clamp_min(1e-30)).item()

# ---- exact at full rank: every module setting × every call setting

DIMS = [(16, 2), (24, 4), (32, 8)]
MODULES = [dict(d=d, h=h, batch_first=bf, bias=b, kv=kv, cross=c)
           for (d,h),bf,b,kv,c in itertools.product(DIMS, (True, False), (True, False), (None, (12, 20)), (False, True))]
def module_id(m):
    on = lambda k, yes, no: yes if m[k] else no
    flags = [on('batch_first', 'bf', 'sf'), on('bias', 'bias', 'nobias'), on('kv', 'kv', 'same'), on('cross', 'cross', 'self')]
    return '-'.join([f"d{m['d']}h{m['h']}", *flags])

MASKS = ['none', 'kpm-bool', 'kpm-float', 'am2-bool', 'am2-float', 'am3-bool', 'am3-float', 'both-bool', 'causal', 'causal-kpm']
WEIGHTS = [dict(need_weights=True), dict(need_weights=True, average_attn_weights=False), dict(need_weights=False)]

def masks(kind, N, H, L, S):
    "The mask arguments of `kind` for N batches of L queries over S keys (bool masks leave key 0 unmasked: no row all masked)"
    kpm = lambda: (torch.rand(N, S) < 0.3).index_fill_(1, torch.tensor([0]), False)
    am = lambda *s: (torch.rand(*s) < 0.3).index_fill_(-1, torch.tensor([0]), False)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    return {'none': {}, 'kpm-bool': dict(key_padding_mask=kpm()), 'kpm-float': dict(key_padding_mask=torch.randn(N, S)),
            'am2-bool': dict(attn_mask=am(L, S)), 'am2-float': dict(attn_mask=torch.randn(L, S)),
            'am3-bool': dict(attn_mask=am(N*H, L, S)), 'am3-float': dict(attn_mask=torch.randn(N*H, L, S)),
            'both-bool': dict(key_padding_mask=kpm(), attn_mask=am(L, S)),
            'causal': dict(attn_mask=causal, is_causal=True),
            'causal-kpm': dict(attn_mask=causal, is_causal=True, key_padding_mask=torch.zeros(N, S).masked_fill(kpm(), -torch.inf))}[kind]

def build(m):
    kdim,vdim = m['kv'] or (None, None)
    return nn.MultiheadAttention(m['d'], m['h'], bias=m['bias'], batch_first=m['batch_first'], kdim=kdim, vdim=vdim).eval()

def inputs(m, N=3, L=5):
    "query, key, value in the module's layout: self-attention passes one tensor three times (what the fast path looks for)"
    S = 7 if m['cross'] or m['kv'] else L
    t = lambda n, e: torch.randn(N, n, e) if m['batch_first'] else torch.randn(n, N, e)
    q = t(L, m['d'])
    if not (m['cross'] or m['kv']): return q, q, q, N, L, S
    kdim,vdim = m['kv'] or (m['d'], m['d'])
    k = t(S, kdim)
    return q, k, k if kdim==vdim else t(S, vdim), N, L, S

def check_same(mha, blk, args, kw, case):
    with torch.no_grad(): (y0,w0),(y1,w1) = mha(*args, **kw),blk(*args, **kw)
    assert y1.shape==y0.shape, f"{case}: output {tuple(y1.shape)} != {tuple(y0.shape)}"
    assert relerr(y1, y0) <= TOL, f"{case}: output relative error {relerr(y1, y0):.2e}"
    assert (w0 is None)==(w1 is None), f"{case}: weights {type(w1)} where the attention returned {type(w0)}"
    if w0 is not None:
        assert w1.shape==w0.shape, f"{case}: weights {tuple(w1.shape)} != {tuple(w0.shape)}"
        assert relerr(w1, w0) <= TOL, f"{case}: weights relative error {relerr(w1, w0):.2e}"

@pytest.mark.parametrize('m', MODULES, ids=module_id)
def test_exact_full_rank(m):
    mha = build(m)
    blk = SVD(mha, rank='full')
    q,k,v,N,L,S = inputs(m)
    for kind,w in itertools.product(MASKS, WEIGHTS):
        if kind.startswith('causal') and L!=S: continue
        check_same(mha, blk, (q, k, v), {**masks(kind, N, m['h'], L, S), **w}, f"{module_id(m)} {kind} {w}")

@pytest.mark.parametrize('batch_first', [True, False])
@pytest.mark.parametrize('cross', [False, True])
def test_unbatched(batch_first, cross):
    mha = nn.MultiheadAttention(16, 2, batch_first=batch_first).eval()
    blk = SVD(mha, rank='full')
    q = torch.randn(5, 16)
    k = torch.randn(7, 16) if cross else q
    S = k.shape[0]
    kpm = torch.rand(S) < 0.3; kpm[0] = False
    calls = [{}, dict(key_padding_mask=kpm), dict(attn_mask=torch.randn(5, S)), dict(attn_mask=torch.randn(2, 5, S))]
    for kw,w in itertools.product(calls, WEIGHTS):
        check_same(mha, blk, (q, k, k), {**kw, **w}, f"unbatched bf={batch_first} cross={cross} {list(kw)} {w}")

@pytest.mark.parametrize('batch_first', [True, False])
@pytest.mark.parametrize('need_weights', [True, False])
def test_dropout_in_training(batch_first, need_weights):
    "In train mode the drop-in draws the same dropout mask from the same seed: the outputs match exactly"
    mha = nn.MultiheadAttention(16, 2, dropout=0.3, batch_first=batch_first).train()
    blk = SVD(mha, rank='full')
    assert blk.training
    q,k = (torch.randn(3, n, 16) if batch_first else torch.randn(n, 3, 16) for n in (5, 7))
    torch.manual_seed(1); y0,w0 = mha(q, k, k, need_weights=need_weights)
    torch.manual_seed(1); y1,w1 = blk(q, k, k, need_weights=need_weights)
    assert relerr(y1, y0) <= TOL, f"dropout: output relative error {relerr(y1, y0):.2e}"
    if need_weights: assert relerr(w1, w0) <= TOL

def test_float64():
    mha = nn.MultiheadAttention(24, 4, kdim=10, vdim=14, dtype=torch.float64).eval()
    blk = SVD(mha, rank='full')
    q,k,v = torch.randn(5, 2, 24, dtype=torch.float64),torch.randn(6, 2, 10, dtype=torch.float64),torch.randn(6, 2, 14, dtype=torch.float64)
    assert all(p.dtype==torch.float64 for p in blk.parameters())
    assert relerr(blk(q, k, v)[0], mha(q, k, v)[0]) < 1e-12

# ---- truncated ranks, rank options, costs

def decaying(m, n):
    "An m×n matrix with singular values falling as a trained layer's do, 0.85^i (random init has a flat spectrum)"
    U,V = torch.linalg.qr(torch.randn(m, m))[0],torch.linalg.qr(torch.randn(n, n))[0]
    k = min(m, n)
    return U[:, :k] @ torch.diag(0.85**torch.arange(k, dtype=torch.float32)) @ V[:, :k].T * 4

def test_error_falls_with_rank():
    "From rank 4 up the output error falls (at ranks 1-2 it hovers near 1: the attention's output is near zero or off)"
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([decaying(32, 32) for _ in 'qkv']))
        mha.out_proj.weight.copy_(decaying(32, 32))
    x,mem = torch.randn(2, 6, 32),torch.randn(2, 9, 32)
    y = mha(x, mem, mem)[0]
    errs = [relerr(SVD(mha, rank=r)(x, mem, mem)[0], y) for r in (4, 8, 12, 16, 24, 32)]
    assert all(a > b for a,b in zip(errs, errs[1:])), f"error does not fall with the rank: {errs}"
    assert errs[-1] <= TOL

def test_eckart_young_per_projection():
    "Each factor pair holds its projection's best rank-r approximation: the squared error is the tail of its singular values"
    mha = nn.MultiheadAttention(24, 4, kdim=12, vdim=20)
    ranks = dict(q=5, k=3, v=7, out=10)
    blk = SVD(mha, rank=ranks)
    for p,lin in projections(mha).items():
        f = getattr(blk, f'{p}_proj')
        W,r = lin.weight.double(),ranks[p]
        err = (f[1].weight.double() @ f[0].weight.double() - W).norm()**2
        tail = (torch.linalg.svdvals(W)[r:]**2).sum()
        assert torch.allclose(err, tail, rtol=1e-4, atol=1e-9), f"{p}: ‖W−BA‖² {err:.4e} != Σσ² past rank {r} {tail:.4e}"
        if lin.bias is not None: assert torch.equal(f[1].bias, lin.bias)

def test_rank_options():
    mha = nn.MultiheadAttention(32, 4, kdim=16, vdim=48)
    whole = attention_costs(32, 16, 48)[0]
    for keep in (0.25, 0.5, 0.9):
        ranks = attention_ranks(mha, keep=keep)
        assert attention_costs(32, 16, 48, ranks)[0] <= keep*whole, f"keep={keep}: {ranks}"
    full = {p: min(l.weight.shape) for p,l in projections(mha).items()}
    assert attention_ranks(mha, rank='full')==full
    assert attention_ranks(mha, percent_removed=0.25)=={p: round(0.75*f) for p,f in full.items()}
    for p,r in attention_ranks(mha, energy=0.8).items():
        s2 = torch.linalg.svdvals(projections(mha)[p].weight.double())**2
        assert s2[:r].sum()/s2.sum() >= 0.8 > s2[:r-1].sum()/s2.sum(), f"energy=0.8: {p} rank {r}"
    assert attention_ranks(mha, rank=dict(q=4, out='full'))==dict(q=4, out=32)

def test_kept_projections_and_attributes():
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    blk = SVD(mha, rank=dict(q=8, k=8, v=8))
    assert isinstance(blk, DECOMPOSED) and isinstance(blk, FactorizedMHA) and not isinstance(blk, Factorized)
    assert (blk.method, blk.rank, blk.source)==('svd', dict(q=8, k=8, v=8), 'MultiheadAttention(32, 4)')
    assert type(blk.out_proj) is nn.Linear and torch.equal(blk.out_proj.weight, mha.out_proj.weight)
    assert blk.out_proj.weight.data_ptr()!=mha.out_proj.weight.data_ptr()           # a copy: training one leaves the other
    for k in ('embed_dim', 'kdim', 'vdim', 'num_heads', 'head_dim', 'batch_first', 'dropout'): assert getattr(blk, k)==getattr(mha, k), k
    assert blk.in_proj_bias is None and not blk._qkv_same_embed_dim and getattr(blk, 'in_proj_weight', None) is None
    params = sum(l.weight.numel() for p in PROJECTIONS for l in getattr(blk, f'{p}_proj').modules() if isinstance(l, nn.Linear))
    assert params==attention_costs(32, ranks=blk.rank)[0]

def test_costs_counted():
    "attention_costs's multiply-adds are those the drop-in and the attention run (the weights path: matmuls FlopCounterMode counts)"
    from torch.utils.flop_counter import FlopCounterMode
    mha = nn.MultiheadAttention(24, 4, kdim=12, vdim=20, batch_first=True).eval()
    q,k,v = torch.randn(2, 5, 24),torch.randn(2, 7, 12),torch.randn(2, 7, 20)
    for m,r in ((mha, None), (SVD(mha, rank=dict(q=4, v=6, out=8)), dict(q=4, v=6, out=8))):
        with FlopCounterMode(display=False) as fc, torch.no_grad(): m(q, k, v)
        assert fc.get_total_flops()//2==2*attention_costs(24, 12, 20, r, L=5, S=7)[1], f"{type(m).__name__}: multiply-adds"

# ---- in models: torchvision's ViT, nn.TransformerEncoder

def small_vit():
    import torchvision
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                                               num_classes=10)
    nn.init.normal_(vit.heads.head.weight)   # (torchvision starts the head at zero: every output would be its bias)
    return vit.eval()

def swap_vit(vit, **opt):
    new = copy.deepcopy(vit)
    for b in new.encoder.layers: b.self_attention = SVD(b.self_attention, **opt)
    return new

def test_vit():
    vit = small_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = vit(x)
        assert relerr(swap_vit(vit, rank='full')(x), y) <= TOL
        assert relerr(swap_vit(vit, keep=0.5)(x), y) > TOL   # truncated: runs, and is not the same model

def encoder(batch_first, nested=False):
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()

def swap_encoder(enc):
    new = copy.deepcopy(enc)
    for l in new.layers: l.self_attn = SVD(l.self_attn, rank='full')
    return new

@pytest.mark.parametrize('batch_first', [True, False])
def test_transformer_encoder(batch_first):
    "nn.TransformerEncoderLayer's fast path (eval, no grad, batch_first: on the packed weights) is off with the drop-in; same outputs"
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # (enable_nested_tensor=False with batch_first=False: a warning about the fast path)
        enc = encoder(batch_first)
    new = swap_encoder(enc)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    kpm = torch.zeros(3, 5, dtype=torch.bool); kpm[0, 3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    for kw in ({}, dict(src_key_padding_mask=kpm), dict(mask=causal, is_causal=True), dict(mask=causal.isinf(), src_key_padding_mask=kpm)):
        with torch.no_grad(): y0,y1 = enc(x, **kw),new(x, **kw)
        assert relerr(y1, y0) <= TOL, f"batch_first={batch_first} {list(kw)}: {relerr(y1, y0):.2e}"
    y0,y1 = enc.layers[0](x),new.layers[0](x)    # one layer, grad enabled
    assert relerr(y1, y0) <= TOL

def test_transformer_encoder_nested():
    "An encoder built for nested tensors reads in_proj_weight on its fast path: a clear error; use_nested_tensor=False: the same outputs"
    enc = encoder(True, nested=True)
    assert enc.use_nested_tensor
    new = swap_encoder(enc)
    x = torch.randn(3, 5, 16)
    kpm = torch.zeros(3, 5, dtype=torch.bool); kpm[0, 3:] = True
    with torch.no_grad(), pytest.raises(AttributeError, match='use_nested_tensor = False'): new(x, src_key_padding_mask=kpm)
    enc.use_nested_tensor = new.use_nested_tensor = False   # (the nested path also zeroes the padded positions: compare like with like)
    with torch.no_grad(): assert relerr(new(x, src_key_padding_mask=kpm), enc(x, src_key_padding_mask=kpm)) <= TOL

# ---- ONNX

def onnx_outputs(model, args, names):
    import onnxruntime as ort
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, args, f, dynamo=False, input_names=names, opset_version=17)
    sess = ort.InferenceSession(f.getvalue(), providers=['CPUExecutionProvider'])
    return [torch.from_numpy(o) for o in sess.run(None, {n: a.numpy() for n,a in zip(names, args)})]

class Call(nn.Module):
    "An attention called as a model: cross-attention with a key padding mask"
    def __init__(self, attn, need_weights): super().__init__(); self.attn,self.need_weights = attn,need_weights
    def forward(self, q, k, kpm): return self.attn(q, k, k, key_padding_mask=kpm, need_weights=self.need_weights)[0]

@pytest.mark.parametrize('need_weights', [True, False])
def test_onnx_dropin(need_weights):
    blk = SVD(nn.MultiheadAttention(16, 2, batch_first=True).eval(), rank=4)
    q,k = torch.randn(2, 5, 16),torch.randn(2, 7, 16)
    kpm = torch.zeros(2, 7, dtype=torch.bool); kpm[1, 5:] = True
    m = Call(blk, need_weights)
    with torch.no_grad(): y = m(q, k, kpm)
    out, = onnx_outputs(m, (q, k, kpm), ['q', 'k', 'kpm'])
    assert relerr(out, y) <= TOL

def test_onnx_vit():
    new = swap_vit(small_vit(), keep=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): y = new(x)
    out, = onnx_outputs(new, (x,), ['x'])
    assert relerr(out, y) <= TOL

# ---- training

def test_gradients_flow():
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)
    blk = SVD(mha, rank=3).train()
    before,orig = copy.deepcopy(blk.state_dict()),copy.deepcopy(mha.state_dict())
    opt = torch.optim.Adam(blk.parameters(), 1e-2)
    q,k,v = torch.randn(2, 5, 16),torch.randn(2, 6, 8),torch.randn(2, 6, 12)
    blk(q, k, v, need_weights=False)[0].pow(2).mean().backward()
    opt.step()
    assert all(not torch.equal(p, before[n]) for n,p in blk.state_dict().items()), "a factor did not change"
    assert all(torch.equal(p, orig[n]) for n,p in mha.state_dict().items()), "the original attention changed"
    frozen = copy.deepcopy(mha).requires_grad_(False)
    assert not any(p.requires_grad for p in SVD(frozen, rank=3).parameters())   # factors train if the weights they replace did

# ---- bad input: a clear error, the layer untouched

def nan_attention():
    mha = nn.MultiheadAttention(16, 2)
    with torch.no_grad(): mha.out_proj.weight[0, 0] = float('nan')
    return mha

class OwnForward(nn.MultiheadAttention):
    def forward(self, *args, **kw): return super().forward(*args, **kw)

BAD = [
    ('add_bias_kv', lambda: nn.MultiheadAttention(16, 2, add_bias_kv=True), {}, ValueError, 'add_bias_kv=True'),
    ('add_zero_attn', lambda: nn.MultiheadAttention(16, 2, add_zero_attn=True), {}, ValueError, 'add_zero_attn=True'),
    ('rank above full', lambda: nn.MultiheadAttention(16, 2, kdim=8), dict(rank=12), ValueError,
     'attn.k_proj: rank=12 is above the full rank 8'),
    ('rank 0', lambda: nn.MultiheadAttention(16, 2), dict(rank=0), ValueError, 'not a rank'),
    ('dict key', lambda: nn.MultiheadAttention(16, 2), dict(rank=dict(query=4)), ValueError, "takes some of the keys 'q', 'k', 'v', 'out'"),
    ('empty dict', lambda: nn.MultiheadAttention(16, 2), dict(rank={}), ValueError, 'takes some of the keys'),
    ('dict and keep', lambda: nn.MultiheadAttention(16, 2), dict(rank=dict(q=4), keep=0.5), ValueError, 'pass only one of'),
    ('dict rank above full', lambda: nn.MultiheadAttention(16, 2), dict(rank=dict(v=17)), ValueError, 'attn.v_proj: rank=17 is above'),
    ('too small for keep', lambda: nn.MultiheadAttention(2, 1), dict(keep=0.5), ValueError, 'too small to factorize'),
    ('Linear', lambda: nn.Linear(16, 16), {}, TypeError, 'takes an nn.MultiheadAttention, but attn is a Linear; use FC_Decomposer().SVD'),
    ('Conv2d', lambda: nn.Conv2d(4, 4, 3), {}, TypeError, "use Conv_Decomposer()'s methods"),
    ('own forward', lambda: OwnForward(16, 2), {}, TypeError, 'with its own forward'),
    ('NaN', lambda: nan_attention(), {}, ValueError, 'NaN or Inf weights (out_proj.weight)'),
]

@pytest.mark.parametrize('case,make,opt,err,msg', BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, make, opt, err, msg):
    layer = make()
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(err, match=msg.replace('(', r'\(').replace(')', r'\)')): SVD(layer, name='attn', **opt)
    after = layer.state_dict()
    same = lambda a, b: torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert before.keys()==after.keys() and all(same(before[k], after[k]) for k in before), f"{case}: layer changed"

def test_bad_calls():
    "Calls nn.MultiheadAttention refuses are refused too, with what to pass"
    blk = SVD(nn.MultiheadAttention(16, 2, batch_first=True), rank=4)
    x = torch.randn(2, 5, 16)
    with pytest.raises(RuntimeError, match='is_causal=True needs the causal attn_mask'): blk(x, x, x, is_causal=True)
    with pytest.raises(TypeError, match='pass a bool mask'): blk(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r'attn_mask of shape \(4, 5\)'): blk(x, x, x, attn_mask=torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r'key_padding_mask of shape \(5, 2\)'):
        blk(x, x, x, key_padding_mask=torch.zeros(5, 2, dtype=torch.bool))
