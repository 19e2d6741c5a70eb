"""DecomposeCallback under fastai's own DDP (`learn.distrib_ctx()`: accelerate's Accelerator, DistributedTrainer, DistributedDL)
in 2 CPU processes over gloo: both decompose alike, and a calibrated decomposition is the one a single process makes on both shards' batches"""
import os, socket, traceback, pytest, torch, torch.distributed as dist, torch.multiprocessing as mp
from datetime import timedelta
from fastai.callback.core import Callback, CancelFitException
from fastai.torch_core import set_seed, trainable_params
from fasterai_lr.cli import digits_dls, digits_learner
from fasterai_lr.callback import DecomposeCallback
from fasterai_lr.calibrate import Calibration
from fasterai_lr.decompose import unwrap
from fasterai_lr.ranks import Budget

WORLD = 2

# Each case: the learner's keyword arguments and DecomposeCallback's (built in each process: a Budget keeps state).
# `splitter=trainable_params` (fastai's default), but in body_head: digits_learner's own body/head splitter reads `model.body`,
# so at the swap the callback must hand it the bare model, not fastai's DDP wrapper.
# (Cases run in turn in the same 2 processes: one that failed in one process only would leave the other waiting in a collective.)
CASES = dict(keep=(dict(splitter=trainable_params), lambda: dict(keep=0.5)),
             body_head=(dict(), lambda: dict(keep=0.5)),
             calib=(dict(splitter=trainable_params), lambda: dict(rank=Budget(params=0.5), calib=True)))

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _state(m): return {k: v.detach().clone().cpu() for k,v in m.state_dict().items()}

class _AtSwap(Callback):
    "What a process holds at the swap: the dense model, and the new one as the decomposer built it (before a new DDP wrapper broadcasts rank 0's weights over it)"
    order = -1
    def __init__(self, stop=False): self.stop = stop   # stop: end the fit right after the swap
    def before_fit(self):
        learn,swap = self.learn,self.learn.swap_model
        def record(model):
            self.dense,self.new = _state(unwrap(learn.model)),_state(unwrap(model))
            old = swap(model)
            self.wrapped = type(learn.model).__name__
            if self.stop: raise CancelFitException()
            return old
        learn.swap_model = record   # (an instance attribute: DecomposeCallback calls self.learn.swap_model)
    def after_fit(self): self.learn.__dict__.pop('swap_model', None)

def _tensor(b):
    "A recorded calibration batch as its input tensor (`Calibration.xs` holds (args, kwargs) pairs)"
    while not isinstance(b, torch.Tensor): b = b[0]
    return b

def _calibration(cb):
    "The Calibration the callback used (`cb.calib_used`: calib=True builds one of learn.dls.train at the swap), as plain data"
    c = cb.calib_used
    if c is None: return None
    return dict(xs=[_tensor(x).cpu() for x in c.xs or []], n_batches=c.n_batches, sequential=c.sequential, damp=c.damp, max_rows=c.max_rows)

def _broadcast_cpu(self, t, rank):
    "fastai's DistributedDL._broadcast on CPU tensors (fastai's own moves them to CUDA for nccl; gloo takes CPU tensors)"
    t = torch.tensor(t, dtype=torch.long)
    dist.broadcast(t, rank)
    return t.tolist()

def _fit(case):
    learn_kw,cb_kw = CASES[case]
    set_seed(0)   # the same weights and batch order in every process
    learn = digits_learner(digits_dls(bs=128), c=8, **learn_kw)
    cb,at = DecomposeCallback(start_epoch=1, method='svd', verbose=False, **cb_kw()),_AtSwap()
    # fastai's own machinery: accelerate's Accelerator wraps the model in DDP and DistributedDL shards dls.train.
    # cpu=True: without it accelerate finds no GPU and sets up no distributed run (no DDP). sync_bn=False: SyncBatchNorm needs a GPU.
    with learn.distrib_ctx(sync_bn=False, cpu=True), learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-3, cbs=[cb, at])
    return dict(arch=repr(unwrap(learn.model)), report=[[str(v) for v in row] for row in cb.report[['layer','method','rank','params_after']].values.tolist()],
                dense=at.dense, new=at.new, wrapped=at.wrapped, final=_state(unwrap(learn.model)), calib=_calibration(cb),
                n_train=len(learn.dls.train.dataset))

def _worker(rank, world, port, out):
    "One process of `WORLD`: the env fastai and accelerate read, then each case in turn (an error is recorded, not raised: the other process must not wait for it)"
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), OMP_NUM_THREADS='1')
    torch.set_num_threads(1)
    from fastai.distributed import DistributedDL
    DistributedDL._broadcast = _broadcast_cpu   # (this process only)
    # accelerate would init the same gloo group from these env vars; here first, to fail in a minute rather than 30 if one process is stuck
    dist.init_process_group('gloo', rank=rank, world_size=world, timeout=timedelta(seconds=60))
    res = {}
    try:
        for case in CASES:
            try: res[case] = _fit(case)
            except Exception: res[case] = dict(error=traceback.format_exc())
        torch.save(res, f'{out}/rank{rank}.pt')
    finally: dist.destroy_process_group()

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "Every case fitted in 2 gloo processes (one spawn: the imports are most of the time): {case: (rank 0's results, rank 1's)}"
    out = tmp_path_factory.mktemp('ddp')
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    r = [torch.load(out/f'rank{i}.pt', weights_only=False) for i in range(WORLD)]
    return {case: (r[0][case], r[1][case]) for case in CASES}

def _ok(runs, case):
    r0,r1 = runs[case]
    for i,r in enumerate((r0, r1)): assert 'error' not in r, f"{case}: process {i} failed:\n{r['error']}"
    return r0,r1

def _rel(a, b): return ((a.double()-b.double()).norm()/b.double().norm().clamp_min(1e-30)).item()

def _factors(state): return {k: v for k,v in state.items() if v.is_floating_point() and 'running' not in k}
def _shapes(state): return {k: tuple(v.shape) for k,v in state.items()}

def check_same_dense(r0, r1, case):
    "Both processes reach the swap with the same dense model, BatchNorm statistics included (the validation pass before it runs through DDP, which broadcasts rank 0's buffers)"
    d0,d1 = r0['dense'],r1['dense']
    diff = [k for k in d0 if not torch.equal(d0[k], d1[k])]
    assert not diff, f"{case}: the processes hold different dense models at the swap: {diff}"

def check_same_decomposition(r0, r1, case):
    "(a) the same architecture and ranks, (b) the same factors as each process built them, and training went on under a new DDP"
    assert r0['report']==r1['report'], f"{case}: the processes' reports differ:\n{r0['report']}\n{r1['report']}"
    assert r0['arch']==r1['arch'], f"{case}: the processes' decomposed architectures differ"
    assert any(m not in ('None', 'nan') for _,m,*_ in r0['report']), f"{case}: nothing was decomposed: {r0['report']}"
    f0,f1 = _factors(r0['new']),_factors(r1['new'])
    assert _shapes(f0)==_shapes(f1), f"{case}: different parameters after the swap"
    diff = {k: _rel(f1[k], f0[k]) for k in f0 if not torch.equal(f0[k], f1[k])}
    assert not diff, f"{case}: the processes built different factors (relative differences {diff})"
    for r in (r0, r1): assert r['wrapped']=='DistributedDataParallel', f"{case}: after the swap learn.model is a {r['wrapped']}, not a DDP"
    assert all(torch.equal(r0['final'][k], r1['final'][k]) for k in _factors(r0['final'])), f"{case}: the processes end the fit with different weights"
    assert any(not torch.equal(r0['final'][k], v) for k,v in f0.items()), f"{case}: the factors did not train after the swap"

def reference(r0, **cb_kw):
    "The factors DecomposeCallback builds in ONE process (no torch.distributed) from rank 0's dense model at the swap (start_epoch=0: before this fit's first step)"
    learn = digits_learner(digits_dls(bs=128), c=8, splitter=trainable_params)
    learn.model.load_state_dict(r0['dense'])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[DecomposeCallback(start_epoch=0, method='svd', verbose=False, **cb_kw), at := _AtSwap(stop=True)])
    return at.new

def check_factors_close(new, ref, tol, case):
    f,g = _factors(new),_factors(ref)
    assert _shapes(f)==_shapes(g), f"{case}: the processes' model and the single-process one have different parameters: {_shapes(f)} vs {_shapes(g)}"
    bad = {k: e for k in f if (e := _rel(f[k], g[k])) > tol}
    assert not bad, f"{case}: factors differ from the single-process ones by more than {tol:g} (relative): {bad}"

# ---- no calibration: the harness itself (fastai's DDP, DistributedDL's shards) and the callback under it

def test_weight_only(runs):
    r0,r1 = _ok(runs, 'keep')
    check_same_dense(r0, r1, 'keep=0.5')
    check_same_decomposition(r0, r1, 'keep=0.5')
    check_factors_close(r0['new'], reference(r0, keep=0.5), 1e-6, 'keep=0.5 vs one process')

def test_body_head_splitter(runs):
    "digits_learner's own splitter reads model.body: at the swap under DistributedTrainer, learn.model is a DDP"
    r0,r1 = _ok(runs, 'body_head')
    check_same_decomposition(r0, r1, 'body/head splitter')

# ---- calib=True: each process calibrates on its shard of dls.train, the statistics are all-reduced

def test_calibrated(runs):
    r0,r1 = _ok(runs, 'calib')
    c0,c1 = r0['calib'],r1['calib']
    assert c0 and c1, "with calib=True the callback should keep the Calibration it used in .calib_used"
    assert c0['xs'] and c1['xs'], f"no calibration batch recorded ({len(c0['xs'])}, {len(c1['xs'])})"
    assert not any(torch.equal(a, b) for a in c0['xs'] for b in c1['xs']), "the two processes calibrated on the same batches: each should draw its own shard of dls.train"
    # DistributedDL: rank 0's shuffled indices (broadcast), padded to a multiple of WORLD, the r-th contiguous slice to rank r, batched at dls.train's bs
    per = -(-r0['n_train']//WORLD)//128
    assert len(c0['xs'])==len(c1['xs'])==min(c0['n_batches'], per), f"calibration batches {len(c0['xs'])}, {len(c1['xs'])}: expected min(n_batches, {per})"
    check_same_dense(r0, r1, 'calib=True')
    check_same_decomposition(r0, r1, 'calib=True')
    opts = {k: c0[k] for k in ('sequential', 'damp', 'max_rows')}
    both = reference(r0, rank=Budget(params=0.5), calib=Calibration(c0['xs'] + c1['xs'], n_batches=len(c0['xs']) + len(c1['xs']), **opts))
    check_factors_close(r0['new'], both, 1e-5, 'calib=True vs one process on both shards')
    alone = reference(r0, rank=Budget(params=0.5), calib=Calibration(c0['xs'], n_batches=len(c0['xs']), **opts))
    f,g = _factors(r0['new']),_factors(alone)
    assert _shapes(f)!=_shapes(g) or max(_rel(f[k], g[k]) for k in f) > 1e-3, "the factors are those of rank 0's shard alone: the statistics were not all-reduced"
