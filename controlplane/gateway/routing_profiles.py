"""The routing-profiles file (``switchboard gateway --routing-profiles FILE``): which scorers,
with what weights, and which picker the SLA router runs per deployment and SLA class.

Parsed with pydantic here, at the edge, into the core's frozen ``ProfileTable``
(``controlplane/core/routing/profiles.py``). The shape (``docs/routing-profiles.yaml`` is the
built-in default, written out)::

    default:                  # every deployment without an entry of its own
      decode:
        scorers: {ItlHeadroom: 3, TtftHeadroom: 2, PrefixOverlap: 2, KvHeadroom: 1,
                  LoadBalance: 1, TenantFairShare: 1}
        picker: MaxScore      # optional; the only picker today
      prefill:
        scorers: {TtftHeadroom: 4, PrefixOverlap: 1, LoadBalance: 1}
      classes:                # optional, per SLA class: {decode, prefill}
        batch:
          decode: {scorers: {KvHeadroom: 2, PrefixOverlap: 2, LoadBalance: 1}}
    moe: {decode: ..., prefill: ...}   # expert-parallel / DP-attention deployments
    deployments:              # by deployment name (or model name for hand-started workers)
      llama-8b-chat:
        decode: {...}
        classes: {interactive: {decode: {...}}}

A profile that leaves out a stage takes that stage from the file's ``default`` (the built-in
one when the file has none); a file without ``default`` / ``moe`` keeps the built-in ones.
Scorer names: ``controlplane.core.routing.profiles.SCORERS``. Errors name the path in the
file, e.g. ``deployments.llama.decode.scorers: unknown scorer 'Foo'``.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from controlplane.core.routing.profiles import (
    DEFAULT_PROFILE,
    MOE_PROFILE,
    DeploymentProfiles,
    ProfileSpec,
    ProfileTable,
    StageSpec,
)
from controlplane.errors import InvalidArgument


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageDoc(_Doc):
    scorers: dict[str, float]
    picker: str = "MaxScore"


class ProfileDoc(_Doc):
    decode: StageDoc | None = None
    prefill: StageDoc | None = None


class EntryDoc(ProfileDoc):
    classes: dict[str, ProfileDoc] = {}


class ProfilesFile(_Doc):
    default: EntryDoc | None = None
    moe: EntryDoc | None = None
    deployments: dict[str, EntryDoc] = {}


def _stage(doc: StageDoc | None, fallback: StageSpec, where: str) -> StageSpec:
    if doc is None:
        return fallback
    try:
        return StageSpec(tuple(doc.scorers.items()), doc.picker)
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}: {e}") from None


def _profile(doc: ProfileDoc | None, base: ProfileSpec, where: str) -> ProfileSpec | None:
    if doc is None or (doc.decode is None and doc.prefill is None):
        return None
    return ProfileSpec(
        decode=_stage(doc.decode, base.decode, f"{where}.decode"),
        prefill=_stage(doc.prefill, base.prefill, f"{where}.prefill"),
    )


def _entry(doc: EntryDoc | None, base: ProfileSpec, where: str) -> DeploymentProfiles:
    if doc is None:
        return DeploymentProfiles()
    return DeploymentProfiles(
        default=_profile(doc, base, where),
        classes={
            name: p
            for name, cdoc in doc.classes.items()
            if (p := _profile(cdoc, base, f"{where}.classes.{name}")) is not None
        },
    )


def profiles_from_dict(data: object) -> ProfileTable:
    """The table a parsed file describes (see the module docstring)."""
    if data is None:
        data = {}
    try:
        doc = ProfilesFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "file"
        raise InvalidArgument(f"routing profiles: {where}: {first['msg']}") from None
    try:
        default = _entry(doc.default, DEFAULT_PROFILE, "default")
        base = default.default or DEFAULT_PROFILE
        default = DeploymentProfiles(base, default.classes)
        moe = _entry(doc.moe, MOE_PROFILE, "moe")
        moe = DeploymentProfiles(moe.default or MOE_PROFILE, moe.classes)
        deployments = {
            name: _entry(entry, base, f"deployments.{name}")
            for name, entry in doc.deployments.items()
        }
    except InvalidArgument as e:
        raise InvalidArgument(f"routing profiles: {e}") from None
    return ProfileTable(default=default, moe=moe, deployments=deployments)


def load_profiles(path: str | Path) -> ProfileTable:
    """``profiles_from_dict`` of a YAML file; errors name the file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InvalidArgument(f"cannot read routing profiles {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{path}: not valid YAML: {e}") from None
    try:
        return profiles_from_dict(data)
    except InvalidArgument as e:
        raise InvalidArgument(f"{path}: {e}") from None
