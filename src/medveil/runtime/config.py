"""A site's YAML configuration: who it is, where its hub is, its datasets and its policy."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medveil.data.sources import DatasetConfig
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.study import NAME_PATTERN


class ConfigError(ValueError):
    pass


class SiteConfig(BaseModel):
    """Everything a node needs to start; relative paths are relative to the YAML file."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(pattern=NAME_PATTERN)
    hub: str
    identity: Path = Path("node.key")
    steward_key: Path = Path("steward.pub")
    state_dir: Path = Path("state")
    poll_wait_s: float = Field(20.0, gt=0, le=30)
    max_message_bytes: int = Field(256 * 1024 * 1024, gt=0)
    policy: DisclosurePolicy = Field(default_factory=DisclosurePolicy)
    datasets: dict[str, DatasetConfig] = Field(default_factory=dict)

    def resolved(self, base: Path) -> "SiteConfig":
        def fix(path: Path) -> Path:
            return path if path.is_absolute() else base / path

        return self.model_copy(update={
            "identity": fix(self.identity),
            "steward_key": fix(self.steward_key),
            "state_dir": fix(self.state_dir),
            "datasets": {name: ds.resolved(base) for name, ds in self.datasets.items()},
        })


def load_site_config(path: Path) -> SiteConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read site config {path}: {exc}") from exc
    try:
        return SiteConfig.model_validate(raw).resolved(path.resolve().parent)
    except ValidationError as exc:
        raise ConfigError(f"invalid site config {path}:\n{exc}") from exc


def dump_site_config(config: SiteConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
