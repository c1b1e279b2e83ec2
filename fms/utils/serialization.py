"""Loading Hugging Face checkpoint folders (single or sharded safetensors) into fms models by name mapping.

Each architecture registers rules `(our parameter regex, [HF name templates], transform)`; several HF
tensors listed for one parameter fill its rows along dim 0 in order (e.g. gate_proj + up_proj -> fused), each
checked first against the rows the config gives it. Every tensor's shape is checked from the file
headers before any weight is copied, and no file outside the checkpoint folder is read. Tensors go to the
parameters' device without a CPU copy of the model. For a CUDA model, the tensors stored in the parameter's dtype
are read by offset (os.preadv) into a ring of pinned host buffers, four reads in flight across tensors, and each
buffer is copied straight into the parameter's rows without the host waiting (_HostStaging.read_into); the rest
(another dtype, a transform, a tensor-parallel slice) go through the same ring one by one and are converted on
the GPU. A CPU model's tensors in the parameter's dtype are read by offset straight into the parameters, several
reads in flight (_read_direct); the others come as views of safetensors' memory map.
"""

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fms.distributed.sharding import tensor_shards


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    pattern: str  # regex over our parameter name; groups fill the templates
    sources: tuple[str, ...]  # HF names, "{0}", "{1}" ... filled from the groups
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    # rows of each source along dim 0, from the model config; required when there are several sources,
    # so that pieces of the wrong sizes whose total happens to fit (q_proj and k_proj swapped) are refused
    split: Callable[[object], tuple[int, ...]] | None = None


_RULES: dict[str, tuple[list[Rule], list[str]]] = {}
_OPTIONAL_PREFIXES: dict[str, tuple[str, ...]] = {}


def register_checkpoint_rules(architecture: str, rules: list[Rule], ignore: list[str] = (),
                              optional_prefixes: tuple[str, ...] = ()) -> None:
    """ignore: regexes of HF tensor names a checkpoint may carry that the model does not use.

    optional_prefixes: prefixes some exports put before the names the rules use (GPT-2's
    "transformer."); a checkpoint's names are matched with such a prefix removed.
    """
    unsplit = [r.pattern for r in rules if len(r.sources) > 1 and r.split is None]
    if unsplit:
        raise ValueError(f"checkpoint rules {unsplit} of {architecture!r} fuse several tensors but give no split")
    _RULES[architecture] = (list(rules), list(ignore))
    _OPTIONAL_PREFIXES[architecture] = tuple(optional_prefixes)


def _llama_core(mlp: list[Rule]) -> list[Rule]:
    layer = r"layers\.(\d+)\."
    return [
        Rule(r"embedding\.weight", ("model.embed_tokens.weight",)),
        Rule(r"head\.weight", ("lm_head.weight",)),
        Rule(r"dec_norm\.weight", ("model.norm.weight",)),
        Rule(layer + r"ln\.weight", ("model.layers.{0}.input_layernorm.weight",)),
        Rule(layer + r"ff_ln\.weight", ("model.layers.{0}.post_attention_layernorm.weight",)),
        Rule(layer + r"mixer\.qkv_fused\.weight", tuple(f"model.layers.{{0}}.self_attn.{n}_proj.weight" for n in "qkv"),
             split=lambda c: (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim)),
        Rule(layer + r"mixer\.dense\.weight", ("model.layers.{0}.self_attn.o_proj.weight",)),
        *mlp,
    ]


_LLAMA_MLP = [
    Rule(r"layers\.(\d+)\.ff\.wg1_fused\.weight",
         ("model.layers.{0}.mlp.gate_proj.weight", "model.layers.{0}.mlp.up_proj.weight"),
         split=lambda c: (c.intermediate_size, c.intermediate_size)),
    Rule(r"layers\.(\d+)\.ff\.w2\.weight", ("model.layers.{0}.mlp.down_proj.weight",)),
]
_GRANITE4_MLP = [
    Rule(r"layers\.(\d+)\.ff\.(?:shared\.)?wg1_fused\.weight", ("model.layers.{0}.shared_mlp.input_linear.weight",)),
    Rule(r"layers\.(\d+)\.ff\.(?:shared\.)?w2\.weight", ("model.layers.{0}.shared_mlp.output_linear.weight",)),
    Rule(r"layers\.(\d+)\.ff\.moe\.router\.weight", ("model.layers.{0}.block_sparse_moe.router.layer.weight",)),
    Rule(r"layers\.(\d+)\.ff\.moe\.w13", ("model.layers.{0}.block_sparse_moe.input_linear.weight",)),
    Rule(r"layers\.(\d+)\.ff\.moe\.w2", ("model.layers.{0}.block_sparse_moe.output_linear.weight",)),
    Rule(r"layers\.(\d+)\.mixer\.mamba\.(.+)", ("model.layers.{0}.mamba.{1}",)),
]
_IGNORE = [r".*rotary_emb\.inv_freq"]

register_checkpoint_rules("llama", _llama_core(_LLAMA_MLP), _IGNORE)
register_checkpoint_rules("granite", _llama_core(_LLAMA_MLP), _IGNORE)
register_checkpoint_rules("granite_hybrid", _llama_core(_GRANITE4_MLP), _IGNORE)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def read_json_object(file: Path) -> dict:
    """The JSON object in file; anything else (bad JSON, a list, ...) is a CheckpointError naming the file."""
    try:
        value = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds {_JSON_TYPES.get(type(value), type(value).__name__)}; "
                              "expected a JSON object {...}")
    return value


def _allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Folders a checkpoint's files may resolve into: its own, and for a Hugging Face hub cache snapshot
    (<repo>/snapshots/<revision>/, whose files are symlinks into <repo>/blobs/) that repository's blobs."""
    root = folder.resolve()
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and blobs.is_dir():
        return root, blobs
    return (root,)


def _inside(folder: Path, roots: tuple[Path, ...], file: str, what: str) -> Path:
    """folder/file, refused when it is absolute or resolves (through .. or symlinks) outside roots."""
    if Path(file).is_absolute():
        raise CheckpointError(f"{what} is an absolute path; a checkpoint's files must lie in its folder {folder}")
    resolved = (folder / file).resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise CheckpointError(
            f"{what} resolves to {resolved}, outside the checkpoint folder {folder.resolve()}; refusing to read it"
        )
    return folder / file


def _open_safetensors(file: Path, device: str = "cpu"):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt", device=device)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read safetensors file {file}: {err}") from err


def _read_device(params) -> str:
    """Where the reader puts the tensors for these parameters: their device when they all share one CPU or CUDA
    device, else the CPU (copy_ then moves each to its parameter)."""
    devices = {p.device for p in params}
    if len(devices) != 1:
        return "cpu"
    (device,) = devices
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
    return "cpu"


def checkpoint_index(model_path: str | Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {model_path} does not exist")
    roots = _allowed_roots(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object")
        files = {}
        for name, file in weight_map.items():
            entry = f"{index}: weight_map[{name!r}] = {file!r}"
            if not isinstance(file, str) or not file:
                raise CheckpointError(f"{entry} is not a file name")
            files[name] = _inside(path, roots, file, entry)
        missing_files = sorted({file for file in weight_map.values() if not (path / file).is_file()})
        if missing_files:
            raise CheckpointError(f"{index} lists shard files that are not in {path}: {missing_files}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no *.safetensors files in {path} (pytorch_model.bin checkpoints are not supported)")
    files = {}
    for shard in shards:
        _inside(path, roots, shard.name, str(shard))
        with _open_safetensors(shard) as f:
            for name in f.keys():
                files[name] = shard
    return files


STAGING_SLOT_BYTES = 64 << 20
STAGING_SLOTS = 4


def _pread_into(dst: torch.Tensor, fd: int, at: int, end: int) -> None:
    """dst (a contiguous 1-D uint8 CPU tensor) <- its numel bytes of the open file fd from offset at (end: where the
    tensor ends, for the error)."""
    view = memoryview(dst.numpy())
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], at + got)
        if n == 0:
            raise OSError(f"the file ends at byte {at + got}, inside a tensor that ends at byte {end}")
        got += n


def _read_direct(jobs: list[tuple[int, int, torch.Tensor]], piece_bytes: int = STAGING_SLOT_BYTES,
                 threads: int = STAGING_SLOTS) -> int:
    """For each (fd, offset, dst), dst a contiguous 1-D uint8 CPU tensor: read its bytes straight into it, in pieces
    of at most piece_bytes on `threads` threads (a CPU model needs no staging). Returns the bytes read; raises the
    first OSError in job order once every read has ended."""
    futures, total = [], 0
    with ThreadPoolExecutor(threads, thread_name_prefix="fms-ckpt-read") as pool:  # leaving waits for every read
        for fd, offset, dst in jobs:
            size = dst.numel()
            for start in range(0, size, piece_bytes):
                piece = dst[start:start + piece_bytes]
                futures.append(pool.submit(_pread_into, piece, fd, offset + start, offset + size))
            total += size
    for future in futures:
        future.result()
    return total


class _HostStaging:
    """Moves checkpoint bytes to `device` through a ring of host buffers (pinned for a GPU), never holding more than
    the ring on the host. Two sources:

    - `read_into(jobs)` (and `read`, one tensor): bytes read from the file itself with os.preadv straight into the
      slots, num_slots pieces in flight on a pool of threads, across tensors (several reads for the disk at once);
    - `to_device(t)`: a CPU tensor (a view of a memory map, or a strided slice) copied into the slots.

    Each slot goes to the device without waiting; a slot is reused once its last transfer has finished, so reading
    the next piece overlaps the transfer of the one before.

    Ours because safetensors' device reads (safe_open(device="cuda")) hand each tensor over whole (the file read
    and the transfer of a tensor take turns) and safetensors has no way to read into a buffer we give it. On an
    H100 (final_project/README.md, section 21) Llama-3.1-8B's cold read took 7.4-8.0 s this way, the disk's own
    rate (2.1 GB/s), against 9.8-10.2 s through the memory map into the ring and 9.0-9.8 s through safetensors."""

    def __init__(self, device: str, slot_bytes: int = STAGING_SLOT_BYTES, num_slots: int = STAGING_SLOTS):
        if slot_bytes < 1 or num_slots < 1:
            raise ValueError(f"slot_bytes and num_slots must be >= 1, got {slot_bytes}, {num_slots}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.slot_bytes, self.num_slots = slot_bytes, num_slots
        self.slots: list[torch.Tensor] = []  # allocated at the first transfer
        self.done = [None] * num_slots  # the CUDA event after each slot's last transfer
        self.next = 0
        self.bytes = 0  # sent to the device
        self._pool = None

    def _slot(self, n: int) -> tuple[int, torch.Tensor]:
        """The next slot (its first n bytes), once its last transfer has finished."""
        if not self.slots:
            self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=self.cuda)
                          for _ in range(self.num_slots)]
        i, self.next = self.next, (self.next + 1) % self.num_slots
        if self.done[i] is not None:
            self.done[i].synchronize()
            self.done[i] = None
        return i, self.slots[i][:n]

    def _send(self, i: int, slot: torch.Tensor, dst: torch.Tensor) -> None:
        dst.copy_(slot, non_blocking=self.cuda)
        self.bytes += slot.numel()
        if self.cuda:  # on the stream of the device copied to, which need not be the current device
            self.done[i] = torch.cuda.current_stream(self.device).record_event()

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of the CPU tensor t on the device (issued; ordered before later work on the current stream)."""
        out = torch.empty(t.shape, dtype=t.dtype, device=self.device)
        src = t.contiguous().reshape(-1).view(torch.uint8)
        dst = out.reshape(-1).view(torch.uint8)
        for start in range(0, src.numel(), self.slot_bytes):
            n = min(self.slot_bytes, src.numel() - start)
            i, slot = self._slot(n)
            slot.copy_(src[start:start + n])
            self._send(i, slot, dst[start:start + n])
        return out

    def read(self, fd: int, offset: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """The tensor of this shape and dtype whose bytes start at `offset` in the open file fd, on the device
        (issued like to_device). Raises OSError if the file ends early."""
        out = torch.empty(shape, dtype=dtype, device=self.device)
        self.read_into([(fd, offset, out.reshape(-1).view(torch.uint8))])
        return out

    def read_into(self, jobs: list[tuple[int, int, torch.Tensor]]) -> None:
        """For each (fd, offset, dst): dst, a contiguous 1-D uint8 tensor on the device, gets its numel bytes from
        the open file fd at offset. Every job is cut into pieces of at most slot_bytes; num_slots pieces are read
        at once on threads (from one tensor or the next ones alike), and each is sent to the device, in order, once
        read (issued like to_device). Raises OSError if a file ends early."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_slots, thread_name_prefix="fms-ckpt-read")
        pending = []  # (slot index, slot, destination, future) in the order they are sent
        try:
            for fd, offset, dst in jobs:
                total = dst.numel()
                for start in range(0, total, self.slot_bytes):
                    n = min(self.slot_bytes, total - start)
                    if len(pending) == self.num_slots:  # every slot is reading: send the oldest before reusing it
                        i, slot, to, future = pending.pop(0)
                        future.result()
                        self._send(i, slot, to)
                    i, slot = self._slot(n)
                    pending.append((i, slot, dst[start:start + n],
                                    self._pool.submit(_pread_into, slot, fd, offset + start, offset + total)))
            for i, slot, to, future in pending:
                future.result()
                self._send(i, slot, to)
        except BaseException:
            for *_, future in pending:  # no read may still be writing a slot that is handed out again
                future.cancel() or future.exception()
            raise

    def finish(self) -> None:
        """Wait for every transfer still reading a slot, and stop the reading threads."""
        for event in self.done:
            if event is not None:
                event.synchronize()
        self.done = [None] * self.num_slots
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _staging_for(device: str) -> "_HostStaging | None":
    """The staging a reader for this device uses: pinned buffers for a GPU, none on the CPU."""
    return _HostStaging(device) if device.startswith("cuda") else None


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class _Reader:
    """Opens each shard once and hands out its tensors (or just their shapes, from the header) by name: on the CPU
    (views of safetensors' memory map), or on the staging's device when given, read from the file by offset
    (the safetensors header: 8 bytes little-endian length, then JSON name -> dtype, shape, data_offsets).
    read_into fills given destinations by offset in one batch, through the staging or straight into CPU memory."""

    def __init__(self, files: dict[str, Path], strip_prefixes: tuple[str, ...] = (),
                 staging: _HostStaging | None = None):
        self._stored = {}  # name the rules use -> name in the file
        for stored in files:
            name = next((stored[len(p):] for p in strip_prefixes if stored.startswith(p)), stored)
            if name in self._stored:
                raise CheckpointError(f"checkpoint holds both {self._stored[name]!r} and {stored!r}")
            self._stored[name] = stored
        self.files = {name: files[stored] for name, stored in self._stored.items()}
        self.staging = staging
        self._open = {}
        self._raw = {}  # file -> (fd, {stored name: header entry}, where the data starts)

    def _read(self, name: str, what: Callable):
        from safetensors import SafetensorError

        file = self.files[name]
        if file not in self._open:
            self._open[file] = _open_safetensors(file)
        try:
            return what(self._open[file], self._stored[name])
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read tensor {self._stored[name]!r} from {file}: {err}") from err

    def _located(self, name: str):
        """(fd, dtype, shape, absolute offset) of a tensor stored whole in a dtype we know, else None."""
        file = self.files[name]
        if file not in self._raw:
            self._read(name, lambda f, stored: None)  # safetensors validates the header (offsets, sizes) first
            fd = os.open(file, os.O_RDONLY)
            try:
                length = int.from_bytes(os.pread(fd, 8, 0), "little")
                header = json.loads(os.pread(fd, length, 8))
            except (OSError, ValueError) as err:
                os.close(fd)
                raise CheckpointError(f"cannot read the safetensors header of {file}: {err}") from err
            self._raw[file] = (fd, {k: v for k, v in header.items() if k != "__metadata__"}, 8 + length)
        fd, header, base = self._raw[file]
        entry = header[self._stored[name]]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            return None
        return fd, dtype, list(entry["shape"]), base + entry["data_offsets"][0]

    def close(self) -> None:
        """Close the files opened for reads by offset (the memory maps close with their tensors)."""
        for fd, *_ in self._raw.values():
            os.close(fd)
        self._raw = {}

    def _moved(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.staging is None else self.staging.to_device(t)

    def _staged(self, name: str, fd, dtype, shape, offset) -> torch.Tensor:
        try:
            return self.staging.read(fd, offset, shape, dtype)
        except OSError as err:
            raise CheckpointError(f"cannot read tensor {self._stored[name]!r} from {self.files[name]}: {err}") from err

    def read_into(self, pairs: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """Fill each (name, destination) whose file tensor has the destination's dtype and element count straight
        from the file (one batch: the disk sees several reads at once, across tensors); the pairs it could not
        fill this way (another dtype, a dtype we do not map; without a staging, a destination off the CPU) are
        returned for get(). Without a staging the bytes go straight into the CPU destinations."""
        jobs, names, left = [], [], []
        for name, dst in pairs:
            if self.staging is None and dst.device.type != "cpu":
                left.append((name, dst))
                continue
            located = self._located(name)
            if (located is None or located[1] != dst.dtype or torch.Size(located[2]).numel() != dst.numel()
                    or not dst.is_contiguous()):
                left.append((name, dst))
                continue
            fd, _, _, offset = located
            jobs.append((fd, offset, dst.reshape(-1).view(torch.uint8)))
            names.append(name)
        try:
            if self.staging is not None:
                self.staging.read_into(jobs)
            else:
                _read_direct(jobs)
        except OSError as err:
            shown = ", ".join(repr(self._stored[n]) for n in names[:3]) + (", ..." if len(names) > 3 else "")
            raise CheckpointError(f"cannot read the tensors {shown}: {err}") from err
        return left

    def get(self, name: str) -> torch.Tensor:
        located = self._located(name) if self.staging is not None else None
        if located is not None:
            return self._staged(name, *located)
        return self._moved(self._read(name, lambda f, stored: f.get_tensor(stored)))

    def shape(self, name: str) -> list[int]:
        return self._read(name, lambda f, stored: list(f.get_slice(stored).get_shape()))

    def get_range(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """tensor[start:stop] along dim 0 or 1, reading only those bytes (a tensor-parallel rank's slice)."""
        located = self._located(name) if self.staging is not None and dim == 0 else None
        if located is not None:  # rows [start, stop) are one run of bytes
            fd, dtype, shape, offset = located
            if not 0 <= start <= stop <= shape[0]:
                raise CheckpointError(f"rows {start}:{stop} of {self._stored[name]!r} {shape} do not exist")
            row = dtype.itemsize * (torch.Size(shape[1:]).numel())
            return self._staged(name, fd, dtype, [stop - start, *shape[1:]], offset + start * row)
        index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
        return self._moved(self._read(name, lambda f, stored: f.get_slice(stored)[index]))


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def _sources_for(name: str, rules: list[Rule]) -> tuple[list[str], Rule]:
    for rule in rules:
        match = re.fullmatch(rule.pattern, name)
        if match:
            return [s.format(*match.groups()) for s in rule.sources], rule
    raise CheckpointError(f"no checkpoint name mapping for parameter {name!r}")


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our tensors to fill; a tied head is filled through the embedding."""
    params = dict(model.named_parameters(remove_duplicate=True))
    return params


def _check_source_shapes(reader: _Reader, name: str, param_shape: tuple[int, ...], sources: list[str], rule: Rule,
                         config) -> None:
    """Each source's shape from its file header against what the config gives it, before reading any data.

    Sources concatenated along dim 0 each get their own rows from rule.split:
        param rows [0, r0) <- sources[0], [r0, r0 + r1) <- sources[1], ...
    """
    if rule.transform is not None:
        return  # the stored layout differs from ours; checked once transformed
    rows = _source_rows(name, param_shape, sources, rule, config)
    start = 0
    for source, num_rows in zip(sources, rows):
        expected = [num_rows, *param_shape[1:]] if param_shape else []
        got = reader.shape(source)
        if got != expected:
            target = f"{name}" if len(sources) == 1 else f"rows {start}:{start + num_rows} of {name}"
            raise CheckpointError(
                f"checkpoint tensor {source} has shape {got}, but the config needs {expected} for {target}"
                + ("" if len(sources) == 1 else f" (fused from {', '.join(sources)})")
            )
        start += num_rows


def _source_rows(name: str, param_shape: tuple[int, ...], sources: list[str], rule: Rule, config) -> tuple[int, ...]:
    """Rows (dim 0) of the full parameter that each source fills, in order."""
    rows = tuple(rule.split(config)) if rule.split else (param_shape[0],)
    if sum(rows) != param_shape[0] or len(rows) != len(sources):
        raise CheckpointError(f"checkpoint rule for {name} splits {list(param_shape)} into rows {list(rows)} "
                              f"for {len(sources)} tensors; the rule does not match the model")
    return rows


def _read_shard(reader: _Reader, name: str, shard, sources: list[str], rule: Rule, config) -> torch.Tensor:
    """Only this rank's slices of the sources (safetensors get_slice), concatenated as the shard says.

    The full parameter is the sources stacked on dim 0 (rows [o_i, o_i + r_i) <- sources[i]); each
    shard piece lies inside one source (a head range inside q_proj, a unit range inside up_proj, ...).
    """
    if rule.transform is not None:
        raise CheckpointError(f"{name} is split across tensor-parallel ranks, but its checkpoint tensor is "
                              "transformed on load; loading it by slices is not supported")
    rows = _source_rows(name, shard.full_shape, sources, rule, config)
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    pieces = []
    for a, b in shard.pieces:
        if shard.dim != 0:
            if len(sources) != 1:
                raise CheckpointError(f"{name} is split on dim {shard.dim} but fused from {len(sources)} tensors")
            pieces.append(reader.get_range(sources[0], shard.dim, a, b))
            continue
        inside = [i for i, (o, r) in enumerate(zip(offsets, rows)) if o <= a and b <= o + r]
        if not inside:
            raise CheckpointError(f"{name}: the rank's rows {a}:{b} straddle two checkpoint tensors {sources}")
        i = inside[0]
        pieces.append(reader.get_range(sources[i], 0, a - offsets[i], b - offsets[i]))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=shard.dim)


def hf_tensors(model: nn.Module, architecture: str) -> dict[str, torch.Tensor]:
    """The inverse of loading: each HF tensor name of the architecture's rules -> a view of the model's parameter
    (a fused parameter cut into its sources' rows), in parameter order. A tied head is listed once, as the
    embedding. Raises CheckpointError for a parameter whose checkpoint tensor is transformed on load."""
    if architecture not in _RULES:
        raise CheckpointError(f"no checkpoint rules for architecture {architecture!r}; known: {sorted(_RULES)}")
    rules, _ = _RULES[architecture]
    tensors = {}
    for name, param in model.named_parameters():
        sources, rule = _sources_for(name, rules)
        if rule.transform is not None:
            raise CheckpointError(f"cannot write {name}: its checkpoint tensor is transformed on load")
        if len(sources) == 1:
            tensors[sources[0]] = param
            continue
        rows = _source_rows(name, tuple(param.shape), sources, rule, model.config)
        tensors.update(zip(sources, param.split(rows, dim=0)))
    return tensors


@torch.no_grad()
def load_hf_checkpoint(model: nn.Module, model_path: str | Path, architecture: str) -> None:
    """Fill model's parameters from the checkpoint folder. A tensor-parallel shard (parameters recorded in
    fms.distributed.sharding) reads only its own slice of each split tensor."""
    if architecture not in _RULES:
        raise CheckpointError(f"no checkpoint rules for architecture {architecture!r}; known: {sorted(_RULES)}")
    params = _parameters(model)
    reader = _Reader(checkpoint_index(model_path), _OPTIONAL_PREFIXES.get(architecture, ()),
                     _staging_for(_read_device(params.values())))
    try:
        _load(model, model_path, architecture, reader, params)
    finally:  # transfers still reading pinned buffers finish before the buffers can be freed
        if reader.staging is not None:
            reader.staging.finish()
        reader.close()


def _load(model: nn.Module, model_path, architecture: str, reader: _Reader, params: dict[str, torch.Tensor]) -> None:
    rules, ignore = _RULES[architecture]
    plan = {}
    missing = []
    for name, param in params.items():
        sources, rule = _sources_for(name, rules)
        absent = [s for s in sources if s not in reader.files]
        if absent:
            missing += [f"{s} (for {name})" for s in absent]
        plan[name] = (param, sources, rule)
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {model_path} is missing tensors: {shown}")
    used = {s for _, sources, _ in plan.values() for s in sources}
    tied = getattr(model.config, "tie_word_embeddings", False)
    unexpected = [
        n for n in reader.files
        if n not in used and not any(re.fullmatch(p, n) for p in ignore) and not (tied and n == "lm_head.weight")
    ]
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise CheckpointError(
            f"checkpoint {model_path} has tensors the {architecture!r} model does not use: {shown} "
            "(is the config.json right for these weights?)"
        )
    shards = tensor_shards(model)
    for name, (param, sources, rule) in plan.items():
        full_shape = shards[name].full_shape if name in shards else tuple(param.shape)
        _check_source_shapes(reader, name, full_shape, sources, rule, model.config)
    # Parameters stored as they are loaded (no transform, not a shard, the file's dtype) are read by offset straight
    # into their rows, all in one batch (through the staging for a CUDA model); the rest below, one by one.
    batched = [name for name, (param, _, rule) in plan.items()
               if name not in shards and rule.transform is None and param.is_contiguous()]
    pairs = []
    for name in batched:
        param, sources, rule = plan[name]
        rows = _source_rows(name, tuple(param.shape), sources, rule, model.config) if param.dim() else (None,)
        start = 0
        for source, num_rows in zip(sources, rows):  # param rows [start, start + num_rows) <- source
            pairs.append((source, param if num_rows is None else param.narrow(0, start, num_rows)))
            start += num_rows or 0
    left = {source for source, _ in reader.read_into(pairs)}
    direct = {name for name in batched if left.isdisjoint(plan[name][1])}
    # copy_ converts to the parameter's dtype on the parameter's device (on the GPU for a CUDA model)
    for name, (param, sources, rule) in plan.items():
        if name in direct:
            continue
        if name in shards:
            param.copy_(_read_shard(reader, name, shards[name], sources, rule, model.config))
            continue
        if rule.transform is None and len(sources) == 1:  # shape checked from the header above
            param.copy_(reader.get(sources[0]))
            continue
        if rule.transform is None:
            # each source straight into its rows (checked above), without concatenating them first:
            #   param rows [0, r0) <- sources[0], [r0, r0 + r1) <- sources[1], ...
            start = 0
            for source in sources:
                piece = reader.get(source)
                param.narrow(0, start, piece.shape[0]).copy_(piece)
                start += piece.shape[0]
            continue
        pieces = [reader.get(s) for s in sources]
        tensor = rule.transform(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0))
        if tuple(tensor.shape) != tuple(param.shape):
            got = " + ".join(f"{s} {list(p.shape)}" for s, p in zip(sources, pieces))
            raise CheckpointError(
                f"checkpoint tensor {got} does not fit {name}: expected shape {list(param.shape)}, "
                f"got {list(tensor.shape)}"
            )
        param.copy_(tensor)
