"""strategy fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) sharding, its sharded checkpoints, and the full
weights gathered for publishing.

Sharding: every decoder layer is its own FSDP unit, then the decoder (embeddings, final norm) and the output
head, the two modules train's loss calls (packing.loss_sum), so one layer's weights are gathered at a time.
Mixed precision gathers the layers in the compute dtype and reduces gradients in float32
(MixedPrecisionPolicy). Gradients are summed over the processes, not averaged (`set_gradient_divide_factor(1)`):
train's loss is already divided by the whole step's target tokens on
every process, as the ddp path's summed all-reduce expects.

Every process must run the same collectives: a process without a micro-batch in a step (or an eval batch)
runs a stand-in batch whose loss counts zero (`stand_in`).

Checkpoints (torch.distributed.checkpoint): every process saves its shards of the trainable weights and the
optimizer state into a local folder (`__<rank>_0.distcp`; rank 0 adds `.metadata`, state.json, scheduler and
RNG), uploads its own files into the attempt's checkpoint folder, and rank 0 writes COMPLETE.json last,
listing every process's files with their sha256. On resume every process downloads the verified folder and
`dcp.load` reshards it onto however many processes there are now; on one process the model is not sharded
and the same checkpoint loads into plain tensors.

Reference: docs/distributed.md.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobs.train import checkpoints

# The project's modules are imported inside the functions that need them: `shard_units` is pure torch, and
# bench/gpu_bench.py loads this file by path on GPU machines without the project's other dependencies.
LOG = logging.getLogger(__name__)
MODEL_DIR, OPTIM = "model", "optim"


def active(config: Any, world: int) -> bool:
    """Whether the model is sharded: strategy fsdp on more than one process (one process has nothing to shard)."""
    return config.strategy == "fsdp" and world > 1


def shard(model: Any, config: Any, compute_dtype: Any, cuda: bool) -> Any:
    """fully_shard the model as train runs it (see shard_units); returns the model (sharded in place)."""
    import torch

    from common.errors import ConfigError
    from jobs.train import packing

    mp = config.fsdp.mixed_precision
    param_dtype = None if mp == "none" or (mp == "auto" and compute_dtype == torch.float32) else (
        compute_dtype if mp == "auto" else getattr(torch, mp))
    decoder, head = packing.head_and_decoder(model)
    layers = _decoder_layers(model)
    if decoder is None or not layers:
        raise ConfigError(f"{config.base_model}: strategy fsdp needs a decoder stack (model.layers) and an output "
                          "head it can shard apart; use strategy ddp for this architecture")
    shard_units([*layers, decoder, head], param_dtype, cpu_offload=config.fsdp.cpu_offload and cuda,
                reshard_after_forward=config.fsdp.reshard_after_forward, cuda=cuda)
    return model


def shard_units(units: list[Any], param_dtype: Any, *, cpu_offload: bool, reshard_after_forward: bool,
                cuda: bool) -> None:
    """fully_shard each unit in order (decoder layers first, then the decoder and the head).

    The loop calls the decoder and the head itself (packing.loss_sum keeps [B, L, V] logits out of memory),
    never the whole model's forward: so they are the outer units, each gathering its own weights.
    """
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for unit in units:
        fully_shard(unit, mp_policy=policy, offload_policy=offload, reshard_after_forward=reshard_after_forward)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # summed, as the loss is normalized by the whole step's tokens
        if not cuda:  # factor 1 is NCCL's PREMUL_SUM, which gloo lacks: a plain SUM (times 1) there
            unit.set_force_sum_reduction_for_comms(True)


def _decoder_layers(model: Any) -> list[Any]:
    """The decoder's ModuleList of layers (the first `layers` list below the top module)."""
    import torch

    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and module is not model:
            return list(layers)
    return []


def stand_in(batches: list[Any], rounds: int, first: Any) -> list[tuple[Any, bool]]:
    """This process's batches padded to `rounds` with `first` (a batch every process has), flagged as real."""
    return [(b, True) for b in batches] + [(first, False)] * (rounds - len(batches))


# --------------------------------------------------------------------------- checkpoints


def _options(trainable_only: bool, full: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=trainable_only)


def save_checkpoint(t: Any) -> str | None:
    """Every process writes its shards into the attempt's checkpoint folder; rank 0 the marker, last."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from common import storage
    from common.manifest import now
    from jobs.train import checkpoints, strategy

    trainable_only = strategy.method_of(t.config) != "full"
    attempt = [t.attempt]
    if t.world > 1:  # each process has an attempt id of its own; the folder is rank 0's
        dist.broadcast_object_list(attempt, src=0)
    name = checkpoints.folder_name(t.state.step, attempt[0])
    uri = storage.join(checkpoints.root(t.config.output), name)
    with tempfile.TemporaryDirectory(prefix="ftjobs-dcp-") as tmp:
        local = Path(tmp)
        model_sd, optim_sd = get_state_dict(t.peft_model, t.optimizer, options=_options(trainable_only))
        dcp.save({MODEL_DIR: model_sd, OPTIM: optim_sd}, checkpoint_id=str(local / "dcp"))
        if t.main:
            _save_host_state(local, t)
        mine = {got.rel: {"sha256": got.sha256, "bytes": got.size} for got in storage.upload_dir(local, uri)}
    everyone: list[Any] = [mine]
    if t.world > 1:
        everyone = [None] * t.world
        dist.all_gather_object(everyone, mine)
    if t.main:
        listed = {rel: want for part in everyone for rel, want in part.items()}
        marker = {"step": t.state.step, "identity": t.identity, "attempt": t.attempt, "created_at": now(),
                  "files": listed, "world": t.world, "format": "dcp"}
        storage.write_bytes(storage.join(uri, checkpoints.MARKER), storage.json_bytes(marker))
    if t.world > 1:
        dist.barrier()
    return uri if t.main else None


def _save_host_state(local: Path, t: Any) -> None:
    import torch

    torch.save(t.scheduler.state_dict(), local / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state()}, local / "rng.pt")
    py_state = random.getstate()
    (local / "state.json").write_text(json.dumps({**t.state.to_json(), "python_rng": [
        py_state[0], list(py_state[1]), py_state[2]]}))


def restore(local: Path, model: Any, optimizer: Any, scheduler: Any, config: Any, rank: int,
            where: str) -> checkpoints.TrainState:
    """Load a verified checkpoint folder written by save_checkpoint, resharded onto this run's processes."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from common.errors import ConfigError
    from jobs.train import checkpoints, strategy

    if not (local / "dcp").is_dir():
        raise ConfigError(f"{where} is not a sharded (strategy fsdp) checkpoint; a run keeps the strategy it "
                          "started with")
    raw = json.loads((local / "state.json").read_text())
    state = checkpoints.TrainState.from_json(raw, where)
    trainable_only = strategy.method_of(config) != "full"
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
    dcp.load({MODEL_DIR: model_sd, OPTIM: optim_sd}, checkpoint_id=str(local / "dcp"))  # in place
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=_options(trainable_only))
    scheduler.load_state_dict(torch.load(local / "scheduler.pt", weights_only=True))
    rng = torch.load(local / "rng.pt", weights_only=True)
    if rank == 0:
        torch.set_rng_state(rng["torch"])
        version, internal, gauss = raw["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    else:
        torch.manual_seed(config.seed + 7919 * rank + state.step)
        random.seed(config.seed + 7919 * rank + state.step)
    return state


def full_weights(t: Any) -> dict[str, Any] | None:
    """The trained weights gathered whole on rank 0 (a collective: every process calls it); None elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from jobs.train import strategy

    trainable_only = strategy.method_of(t.config) != "full"
    sd = get_model_state_dict(t.peft_model, options=_options(trainable_only, full=True))
    return sd if t.main else None
