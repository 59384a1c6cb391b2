"""Data-parallel training with torchrun: one process per device, one model replica each.

Launch (CPU: gloo, GPU: nccl, one process per GPU)::

    torchrun --standalone --nproc_per_node=2 -m hashexp dataset=synthetic hashing=simhash ...

``from_env`` returns a :class:`Dist` when torchrun set ``WORLD_SIZE > 1``, else None, and the
trainer runs single-process exactly as before. With a Dist:

- every rank draws the same permutation (identically seeded generator) and trains on its
  slice of each global batch (``trainer.batch_size`` is the *global* batch); the loss is scaled
  so that DDP's gradient average equals the single-process mean over the global batch, also
  for a short last batch (a rank whose slice is empty still joins the all-reduce);
- augmentation is applied to the whole global batch on every rank (identical generator) and
  then sliced, so each sample sees the augmentation it would see in a single process;
- activation mass is summed over ranks before a rehash; rank 0 alone plans each merge and
  broadcasts the :class:`~hashexp.merge.surgery.MergePlan`, so every replica does the same
  surgery; after it the DDP wrapper is rebuilt around the new parameters;
- BatchNorm uses per-rank batch statistics (plain DDP; SyncBatchNorm has no CPU kernel) and
  rank 0's running statistics are broadcast before every rehash and evaluation, so all ranks
  merge and evaluate the same network. Models without BatchNorm match a single-process run
  up to float summation order;
- every rank evaluates the full splits (identical numbers); only rank 0 writes the run dir
  (history.csv, metrics.json, model.pt, checkpoint.pt, logger). Ranks > 0 run Hydra with
  ``hydra.output_subdir=null``, stdout-only logging and a throw-away run dir in the system
  temp dir that is removed at exit (see ``hashexp/__main__.py``); they use rank 0's run dir,
  which is broadcast to them, for resuming.

Multi-node runs need the run dir (checkpoints) on a shared file system; a Hydra multirun
(``-m``) under torchrun is not supported.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from hashexp.errors import ConfigError

_FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def world_size_from_env() -> int:
    """torchrun's ``WORLD_SIZE`` (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer; launch with torchrun") from None


def rank_from_env() -> int:
    """torchrun's ``RANK`` (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


def from_env(cfg=None) -> Dist | None:
    """A process-group handle when launched by torchrun (WORLD_SIZE > 1), else None.

    The backend is nccl when the trainer runs on CUDA (``trainer.device`` cuda or auto with a
    GPU), gloo otherwise; ``HASHEXP_DIST_BACKEND`` overrides it.
    """
    if world_size_from_env() <= 1:
        return None
    device = "cpu"
    if cfg is not None:
        try:
            device = str(cfg.trainer.get("device", "cpu"))
        except Exception:
            device = "cpu"
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = os.environ.get("HASHEXP_DIST_BACKEND") or ("nccl" if use_cuda else "gloo")
    return Dist(backend=backend, use_cuda=use_cuda)


class Dist:
    """One rank of a torchrun job: collectives the trainer and the compressor use.

    Attributes:
        rank, world_size, local_rank: from torchrun's environment.
        is_main: rank 0, the only rank that writes files.
    """

    def __init__(self, backend: str = "gloo", use_cuda: bool = False) -> None:
        for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if k not in os.environ:
                raise ConfigError(f"distributed run without {k} in the environment; launch with "
                                  f"`torchrun --nproc_per_node=N -m hashexp ...`")
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.use_cuda = use_cuda
        if use_cuda:
            if not torch.cuda.is_available():
                raise ConfigError("trainer.device asks for CUDA but no GPU is visible; use trainer.device=cpu")
            torch.cuda.set_device(self.local_rank)
        if not tdist.is_initialized():
            tdist.init_process_group(backend=backend)
        self.backend = tdist.get_backend()
        self.rank = tdist.get_rank()
        self.world_size = tdist.get_world_size()
        self.comm_device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        self._ddp: nn.Module | None = None
        self._ddp_key: tuple | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that writes files."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world_size={self.world_size}, backend={self.backend})"

    # ------------------------------------------------------------------ devices and model
    def local_device(self, device: torch.device) -> torch.device:
        """``cuda`` without an index means this rank's GPU."""
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)``, rebuilt only when the parameters changed.

        Surgery replaces parameters (new tensors, new shapes); the old wrapper's reducer still
        references the old ones, so they cannot be recycled and the identity key is safe.
        """
        params = list(model.parameters())
        key = (id(model), tuple((id(p), tuple(p.shape)) for p in params))
        if self._ddp is None or key != self._ddp_key:
            from torch.nn.parallel import DistributedDataParallel

            dev = params[0].device if params else torch.device("cpu")
            ids = [dev.index if dev.index is not None else self.local_rank] if dev.type == "cuda" else None
            self._ddp = None  # drop the stale reducer before building the new one
            self._ddp = DistributedDataParallel(model, device_ids=ids)
            self._ddp_key = key
        return self._ddp

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank."""
        for b in model.buffers():
            if b.is_floating_point() or b.dtype in (torch.long, torch.int):
                t = b.detach().to(self.comm_device)
                tdist.broadcast(t, 0)
                if t.data_ptr() != b.data_ptr():
                    b.copy_(t)

    # ------------------------------------------------------------------ data
    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's [lo, hi) of a global batch of ``n`` samples (sizes differ by at most one)."""
        return (self.rank * n) // self.world_size, ((self.rank + 1) * n) // self.world_size

    def shard(self, batches: Iterable, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
              start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each rank's slice of every global batch of ``batches``.

        All ranks hold the same generator state, so they iterate the same global batches; rank
        r keeps rows ``bounds(n)``. A global batch smaller than the world size gives some ranks
        an empty slice (they still run forward/backward so that DDP's all-reduce completes).
        ``transform`` (augmentation) is applied to the whole global batch before slicing. A
        :class:`~hashexp.data.BatchIterator` without a transform gathers only this rank's rows.
        ``start`` skips the first global batches (a mid-epoch resume) without transforming them.
        """
        from hashexp.data import BatchIterator

        if isinstance(batches, BatchIterator) and transform is None:
            idx = batches.order()
            n, b = batches.num_samples, batches.batch_size
            for i in range(start, len(batches)):
                j = idx[i * b: min((i + 1) * b, n)]
                lo, hi = self.bounds(len(j))
                j = j[lo:hi]
                yield batches.x[j], batches.y[j]
            return
        for xb, yb in itertools.islice(iter(batches), start, None):
            if transform is not None:
                xb = transform(xb)
            lo, hi = self.bounds(len(xb))
            yield xb[lo:hi], yb[lo:hi]

    def loss(self, net: nn.Module, xb: torch.Tensor, yb: torch.Tensor, n_global: int):
        """(loss to backpropagate, global mean loss) for this rank's slice of a global batch.

        DDP averages gradients over the ranks; scaling the local loss sum by
        world_size / n_global makes that average the gradient of the mean over the global
        batch, whatever the slice sizes (an empty slice contributes zeros and still joins the
        all-reduce). The reported loss is summed over ranks, so every rank sees the same value.
        """
        out = net(xb)
        ws = self.world_size
        if len(yb):
            if len(yb) * ws == n_global:  # equal slices: the plain mean, scaled by exactly 1
                loss = F.cross_entropy(out, yb)
                local_sum = loss.detach() * len(yb)
            else:
                local_sum = F.cross_entropy(out, yb, reduction="sum")
                loss = local_sum * (ws / n_global)
                local_sum = local_sum.detach()
        else:
            loss = out.sum() * 0.0
            local_sum = loss.detach()
        total = self.all_reduce_sum(local_sum.float().reshape(1))
        return loss, (total / n_global)[0]

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a new tensor on ``tensor``'s device and dtype; the input is untouched)."""
        t = tensor.detach().to(self.comm_device, copy=True)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.to(tensor.device)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """A picklable object from rank ``src`` on every rank."""
        box = [obj]
        tdist.broadcast_object_list(box, src=src, device=self.comm_device if self.backend == "nccl" else None)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_plan(self, plan, site):
        """Rank 0's MergePlan for ``site`` (or None) on every rank, on the site's device.

        Tensors only (no pickling): a header [has_plan, new_width, width, dtype], then labels
        and the stacked coefficients r, m, a. Other ranks' ``plan`` arguments are ignored.
        """
        from hashexp.merge.surgery import MergePlan

        dev = site.device
        header = torch.zeros(4, dtype=torch.long, device=self.comm_device)
        if self.is_main and plan is not None:
            dtype_code = _FLOAT_DTYPES.index(plan.r.dtype) if plan.r.dtype in _FLOAT_DTYPES else 1
            header[:] = torch.tensor([1, int(plan.new_width), int(plan.labels.numel()), dtype_code])
        tdist.broadcast(header, 0)
        has, new_width, width, code = (int(v) for v in header.tolist())
        if not has:
            return None
        dtype = _FLOAT_DTYPES[code]
        if self.is_main:
            labels = plan.labels.detach().to(self.comm_device, torch.long)
            coef = torch.stack([plan.r, plan.m, plan.a]).detach().to(self.comm_device, dtype)
        else:
            labels = torch.empty(width, dtype=torch.long, device=self.comm_device)
            coef = torch.empty(3, width, dtype=dtype, device=self.comm_device)
        tdist.broadcast(labels, 0)
        tdist.broadcast(coef, 0)
        if self.is_main:
            return plan
        coef = coef.to(dev)
        return MergePlan(labels=labels.to(dev), r=coef[0].clone(), m=coef[1].clone(), a=coef[2].clone(),
                         new_width=new_width)

    def close(self) -> None:
        """Tear down the process group (idempotent)."""
        self._ddp = None
        if tdist.is_initialized():
            tdist.destroy_process_group()


# ---------------------------------------------------------------------- Hydra on ranks > 0
def rank_argv(argv: list[str], tmp_dir: str) -> list[str]:
    """Hydra overrides for a rank > 0: no .hydra/, no log file, a throw-away run dir.

    The rank still composes the same config; its run dir is replaced by ``tmp_dir`` (rank 0's
    is broadcast to it once the process group is up) so it leaves nothing under outputs/.
    """
    keep = [a for a in argv if not a.lstrip("+").startswith("hydra.run.dir=")
            and not a.lstrip("+").startswith("hydra.output_subdir=")
            and not a.lstrip("+").startswith("hydra/job_logging=")]
    return keep + [f"hydra.run.dir={tmp_dir}", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
