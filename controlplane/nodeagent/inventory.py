"""Where a node's GPU inventory comes from: NVML on GPU hosts, a declaration elsewhere.

``GpuProbe.read()`` returns the GPUs with their live figures (free memory, health). The agent
calls it at start and every report interval.

* ``NvmlProbe`` asks the NVIDIA driver through NVML (``nvidia-ml-py``). NVLink domains are the
  connected components of the NVLink graph (GPUs joined by an active link, directly or through
  NVSwitch, share a domain); a GPU with no active link is a domain of its own.
  Health: the device answers, and no row-remapping failure or pending page retirement.
  Runs only on hosts with an NVIDIA driver; its test is marked ``gpu``.
* ``DeclaredProbe`` serves a declared inventory (flags or YAML): what CPU machines, local
  clusters and tests use. Figures stay as declared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controlplane.core.model import GIB, Gpu
from controlplane.errors import InvalidArgument, Unavailable


class GpuProbe(Protocol):
    def read(self) -> tuple[Gpu, ...]:
        """The host's GPUs now. Raises Unavailable if the driver cannot be read."""
        ...


# --- declared inventories ----------------------------------------------------------------


class DeclaredGpus(BaseModel):
    """The GPUs of a host without NVML (or one that wants to override it)."""

    model_config = ConfigDict(extra="forbid")

    count: int = Field(default=0, ge=0, le=64, description="number of GPUs")
    model: str = Field(default="NVIDIA H100 80GB HBM3", min_length=1)
    memory_gib: float = Field(default=80.0, gt=0, description="memory per GPU, GiB")
    used_gib: float = Field(default=0.0, ge=0, description="memory already in use per GPU, GiB")
    nvlink_domain_size: int = Field(
        default=0, ge=0, description="GPUs per NVLink domain; 0 = all GPUs in one domain"
    )


class DeclaredNode(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_id: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    gpus: DeclaredGpus = Field(default_factory=DeclaredGpus)


def _pydantic_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def load_declared(path: Path) -> DeclaredNode:
    try:
        raw: Any = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InvalidArgument(f"inventory file {path}: {e}") from None
    return declared_from_mapping(raw, source=str(path))


def declared_from_mapping(raw: Mapping[str, Any], source: str = "inventory") -> DeclaredNode:
    try:
        return DeclaredNode.model_validate(raw)
    except ValidationError as e:
        raise InvalidArgument(f"{source}: {_pydantic_message(e)}") from None


def declared_gpus(decl: DeclaredGpus, node_id: str) -> tuple[Gpu, ...]:
    if decl.used_gib > decl.memory_gib:
        raise InvalidArgument(
            f"gpus.used_gib {decl.used_gib} exceeds gpus.memory_gib {decl.memory_gib}"
        )
    total = int(decl.memory_gib * GIB)
    free = total - int(decl.used_gib * GIB)
    size = decl.nvlink_domain_size or max(decl.count, 1)
    return tuple(
        Gpu(
            index=i,
            uuid=f"GPU-declared-{node_id}-{i}",
            model=decl.model,
            memory_total_bytes=total,
            memory_free_bytes=free,
            nvlink_domain=f"{node_id}/nvl{i // size}",
            healthy=True,
        )
        for i in range(decl.count)
    )


class DeclaredProbe:
    def __init__(self, gpus: tuple[Gpu, ...]) -> None:
        self._gpus = gpus

    def read(self) -> tuple[Gpu, ...]:
        return self._gpus


# --- NVML ----------------------------------------------------------------------------------


def nvml_available() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def nvlink_domains(n: int, links: Mapping[int, set[int]], node_id: str) -> list[str]:
    """Connected components of the NVLink graph, named ``<node>/nvl<k>`` (pure)."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, peers in links.items():
        for b in peers:
            if 0 <= b < n:
                parent[find(a)] = find(b)
    roots: dict[int, int] = {}
    return [f"{node_id}/nvl{roots.setdefault(find(i), len(roots))}" for i in range(n)]


class NvmlProbe:
    """Reads GPUs through NVML. Only on hosts with an NVIDIA driver."""

    def __init__(self, node_id: str) -> None:
        import pynvml

        self._nvml = pynvml
        self._node_id = node_id
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise Unavailable(f"NVML: {e}") from None

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()

    def read(self) -> tuple[Gpu, ...]:
        nv = self._nvml
        try:
            count = nv.nvmlDeviceGetCount()
            handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            bus_ids = {self._bus_id(nv.nvmlDeviceGetPciInfo(h)): i for i, h in enumerate(handles)}
            links: dict[int, set[int]] = {}
            for i, h in enumerate(handles):
                links[i] = self._nvlink_peers(h, bus_ids)
            switched = {i for i, peers in links.items() if -1 in peers}  # one NVSwitch fabric
            for i in switched:
                links[i] = (links[i] - {-1}) | switched
            domains = nvlink_domains(count, links, self._node_id)
            gpus = []
            for i, h in enumerate(handles):
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                name = nv.nvmlDeviceGetName(h)
                uuid = nv.nvmlDeviceGetUUID(h)
                gpus.append(
                    Gpu(
                        index=i,
                        uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                        model=name.decode() if isinstance(name, bytes) else str(name),
                        memory_total_bytes=int(mem.total),
                        memory_free_bytes=int(mem.free),
                        nvlink_domain=domains[i],
                        healthy=self._healthy(h),
                    )
                )
            return tuple(gpus)
        except nv.NVMLError as e:
            raise Unavailable(f"NVML: {e}") from None

    @staticmethod
    def _bus_id(pci: Any) -> str:
        bus = pci.busId
        return (bus.decode() if isinstance(bus, bytes) else str(bus)).lower()[-12:]

    def _nvlink_peers(self, handle: Any, bus_ids: Mapping[str, int]) -> set[int]:
        nv = self._nvml
        peers: set[int] = set()
        switch_attached = False
        for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                if nv.nvmlDeviceGetNvLinkState(handle, link) != nv.NVML_FEATURE_ENABLED:
                    continue
                remote = self._bus_id(nv.nvmlDeviceGetNvLinkRemotePciInfo(handle, link))
            except nv.NVMLError:
                continue
            if remote in bus_ids:
                peers.add(bus_ids[remote])
            else:
                switch_attached = True  # link goes to an NVSwitch, not straight to a GPU
        if switch_attached:
            peers.add(-1)  # marker: joined through the switch fabric
        return peers

    def _healthy(self, handle: Any) -> bool:
        nv = self._nvml
        try:
            remap = nv.nvmlDeviceGetRemappedRows(handle)
            # (corrected rows, uncorrected rows, is pending, failure occurred)
            if bool(remap[2]) or bool(remap[3]):
                return False
        except nv.NVMLError:
            pass  # not supported on this GPU: no evidence either way
        return True
