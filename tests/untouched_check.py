"Did a failed call change the model? A snapshot of its state, modules, parameters and train modes, and the check (NaN- and meta-aware)"
import torch
from torch import nn

def _same(a, b):
    if not isinstance(a, torch.Tensor): return a==b
    if not isinstance(b, torch.Tensor) or (a.dtype, a.shape, a.device)!=(b.dtype, b.shape, b.device): return False
    if a.is_meta: return True
    return bool(((a==b) | (a.isnan() & b.isnan())).all()) if a.is_floating_point() else torch.equal(a, b)

def snapshot(m):
    if not isinstance(m, nn.Module): return None
    return ({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k,v in m.state_dict().items()}, [(n, type(x), id(x), x.training) for n,x in m.named_modules()],
            [(n, id(p), p.requires_grad) for n,p in m.named_parameters()])

def assert_untouched(before, m, case):
    if before is None: return
    state,mods,params = before
    now = snapshot(m)
    assert now[1]==mods and now[2]==params, f"{case}: the modules or parameters changed"
    assert now[0].keys()==state.keys() and all(_same(state[k], now[0][k]) for k in state), f"{case}: the state_dict changed"
