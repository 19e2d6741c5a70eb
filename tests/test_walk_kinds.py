"The model walk on the layers that are not a plain Linear or conv: attention (torchvision's ViT), timm's reshaping convs, GPT-2's Conv1D"
import sys, pytest, torch, torchvision
from torch import nn
from fasterai_lr.core import DECOMPOSED
from fasterai_lr.layers import FactorizedMHA
from fasterai_lr.decompose import decompose_model
from fasterai_lr.export import save_decomposed, load_decomposed, to_onnx, onnx_error

def relerr(a, b): return ((a-b).norm()/b.norm()).item()

def vit():
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(m.heads.head.weight, 0, 0.02)   # (torchvision starts it at zero: every output would be the bias)
    return m.eval()

@pytest.mark.parametrize('sample', [True, False])
def test_vit_attention_walked(sample, tmp_path):
    "Every attention of a ViT becomes a FactorizedMHA: exact at rank='full', smaller at keep=0.5, reloaded from its plan, exported to ONNX"
    m,x = vit(),torch.randn(2, 3, 32, 32)
    s = x if sample else None
    full,rep = decompose_model(m, rank='full', sample=s, quiet=True)
    assert sum(isinstance(a, FactorizedMHA) for a in full.modules())==2, rep[['layer','note']]
    assert relerr(full(x), m(x)) < 1e-5
    small,rep = decompose_model(m, keep=0.5, sample=s, quiet=True)
    attn = rep[rep.layer.str.endswith('self_attention')]
    assert (attn.params_after <= 0.5*attn.params).all(), attn
    save_decomposed(small, tmp_path/'vit.pth')
    torch.testing.assert_close(load_decomposed(vit, tmp_path/'vit.pth').eval()(x), small(x), rtol=0, atol=0)
    assert onnx_error(to_onnx(small, x, tmp_path/'vit.onnx', dynamo=False), small, x) < 1e-4

@pytest.mark.parametrize('batch_first', [True, False])
@pytest.mark.parametrize('norm_first', [False, True])
@pytest.mark.parametrize('only', [None, 'linear1', 'self_attn'])
def test_transformer_encoder_layer_walked(batch_first, norm_first, only):
    """nn.TransformerEncoderLayer's inference fast path reads its attention's and Linears' packed weights: the walk turns it off for the
    layers it rebuilds (`ADAPTERS`), so each of them is decomposed alone or with the others; exact at full rank in eval mode under no_grad
    (where the fast path ran), with a padding mask, and the nested-tensor path of the encoder off"""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=norm_first), 2,
                                enable_nested_tensor=not norm_first).eval()
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    mask = torch.zeros(3, 7, dtype=torch.bool); mask[0, 5:] = True
    layers = None if only is None else [f'layers.{i}.{only}' for i in range(2)]
    new,rep = decompose_model(enc, rank='full', layers=layers, head=True, quiet=True)
    assert rep.method.notna().sum() == (6 if only is None else 2) and (rep.note.fillna('')=='').all(), rep
    with torch.no_grad():
        for kw in ({}, dict(src_key_padding_mask=mask)):   # (outputs at padded positions are undefined: the fast path gives 0)
            valid = lambda t: (t if batch_first else t.transpose(0, 1))[~mask if kw else torch.ones_like(mask)]
            torch.testing.assert_close(valid(new(x, **kw)), valid(enc(x, **kw)), atol=2e-5, rtol=1e-5)
    small,_ = decompose_model(enc, keep=0.5, head=True, quiet=True)
    small.train(); small(x).sum().backward()
    assert all(p.grad is not None for p in small.parameters() if p.requires_grad)

def timm():
    for p in ('/tmp/timm_pkg',):
        if p not in sys.path: sys.path.append(p)
    return pytest.importorskip('timm')

def test_timm_reshaping_convs_walked():
    "timm's Conv2dSame and StdConv2d in a model: decomposed through their effective weights, exact at full rank at two input sizes"
    layers = timm().layers
    torch.manual_seed(0)
    m = nn.Sequential(layers.StdConv2d(3, 16, 3, padding=1), nn.ReLU(), layers.Conv2dSame(16, 24, 3, stride=2), nn.ReLU(),
                      layers.ScaledStdConv2d(24, 24, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)).eval()
    for method in ('tucker', 'cp', 'svd', 'spatial'):
        new,rep = decompose_model(m, method, rank='full', quiet=True)
        assert rep['method'].notna().sum()==3, rep[['layer','note']]
        for s in (15, 16): x = torch.randn(2, 3, s, s); assert relerr(new(x), m(x)) < 1e-5, (method, s)

def test_gpt2_conv1d_walked():
    "GPT-2's transformers Conv1D (a Linear with its weight transposed): decomposed by SVD, exact at full rank"
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    m = GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=16)).eval()
    ids = torch.randint(0, 100, (2, 8))
    new,rep = decompose_model(m, rank='full', sample=ids, quiet=True)
    conv1d = rep[rep.source.str.startswith('Conv1D')]
    assert len(conv1d)==8 and conv1d['method'].eq('svd').all(), rep[['layer','source','note']]
    assert relerr(new(ids).last_hidden_state, m(ids).last_hidden_state) < 1e-5
