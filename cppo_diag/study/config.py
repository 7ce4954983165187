"""Study configuration: a grid of rules x parameter settings x seeds, loaded from TOML or YAML.

A study file (see ``docs/study.md`` and the presets in ``cppo_diag/study/presets/``)::

    [study]
    name = "cpu"
    description = "..."
    rules = ["grpo_clip", "dppo", "cppo"]
    seeds = [0, 1, 2, 3, 4]          # or an int N meaning 0..N-1

    [trainer]
    preset = "demo"                   # the trainer's preset name or a trainer config file
    steps = 40                        # RL iterations per run (the trainer's step count)
    [trainer.set]                     # trainer config overrides shared by every run (dotted keys)
    "optim.lr" = 3e-4

    [rule_params.cppo]                # keyword arguments of one rule (SPEC.md names), all settings
    delta = 0.15

    [[settings]]                      # optional extra grid axis; one unnamed setting if absent
    name = "lr-high"
    set = { "optim.lr" = 1e-3 }
    rule_params = { cppo = { w_min = 0.7 } }

    [analysis]
    accuracy = "eval/greedy_acc"      # scalar holding held-out accuracy (the default)
    threshold = 0.5                   # "steps to reach" this accuracy
    reference = "cppo"                # paired comparisons: reference vs every other rule
    primary = "final"                 # "final" (mean of the last final_window evaluations) or "best" (biased)
    final_window = 3                  # evaluations averaged into final_acc

Cells are ordered seed-major (all rules for seed 0, then seed 1, ...) so that a study stopped early
still has complete paired comparisons for the seeds it finished.
"""

from __future__ import annotations

import copy
import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cppo_diag import metric_names as M

__all__ = [
    "PRESETS",
    "StudyConfig",
    "Cell",
    "AnalysisConfig",
    "StudyConfigError",
    "load_study",
    "list_presets",
    "preset_path",
]

PRESETS = ("cpu", "long", "calib-long", "ci-tiny", "gpu", "gpu-smoke")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StudyConfigError(ValueError):
    """A study file that cannot be used; the message names the field, the expected and the found."""


@dataclass(frozen=True)
class AnalysisConfig:
    accuracy: str = M.EVAL_GREEDY_ACC  # per-step scalar with held-out accuracy (the trainer's greedy accuracy)
    threshold: float = 0.5  # steps to first reach this held-out accuracy
    reference: str = "cppo"  # the rule compared against every other rule (paired, same seeds)
    primary: str = "final"  # "final" | "best": lead metric (best-so-far is biased upward: secondary by default)
    final_window: int = 3  # final_acc = mean of the last final_window evaluations after the initial one
    confidence: float = 0.95
    ablation_rules: tuple[str, ...] = ("cppo", "cppo_no_weight", "cppo_no_budget", "cppo_shuffled")
    position_bin_width: int = 8  # token-position bin of the Fig. 2-style plots
    n_boot: int = 10_000


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    rule: str
    seed: int
    setting: str  # "" for the single default setting
    run_name: str  # directory name under the study root
    overrides: dict[str, Any]  # trainer config overrides (dotted keys), study-wide + setting
    rule_params: dict[str, Any]  # keyword arguments of the rule

    @property
    def label(self) -> str:
        """Rule plus setting, the unit that seeds are aggregated over."""
        return f"{self.rule}@{self.setting}" if self.setting else self.rule


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    rule_params: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyConfig:
    name: str
    description: str
    rules: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    trainer_preset: str | None
    trainer_config: str | None
    overrides: dict[str, Any]
    rule_params: dict[str, dict[str, Any]]
    settings: tuple[Setting, ...]
    analysis: AnalysisConfig
    source: str  # the file it was loaded from
    raw: dict[str, Any]  # the parsed file, saved next to the runs

    def cells(self) -> list[Cell]:
        """The whole grid, seed-major: for each seed, each setting, each rule."""
        out = []
        multi = len(self.settings) > 1 or (self.settings and self.settings[0].name)
        for seed in self.seeds:
            for setting in self.settings:
                for rule in self.rules:
                    params = {**self.rule_params.get(rule, {}), **setting.rule_params.get(rule, {})}
                    name = f"{rule}-{setting.name}-s{seed}" if multi else f"{rule}-s{seed}"
                    out.append(
                        Cell(
                            rule=rule,
                            seed=seed,
                            setting=setting.name if multi else "",
                            run_name=name,
                            overrides={**self.overrides, **setting.overrides},
                            rule_params=params,
                        )
                    )
        return out

    def labels(self) -> list[str]:
        """Rule(@setting) labels in grid order."""
        seen: dict[str, None] = {}
        for c in self.cells():
            seen.setdefault(c.label, None)
        return list(seen)


def list_presets() -> list[str]:
    return list(PRESETS)


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise StudyConfigError(f"study preset: expected one of {', '.join(PRESETS)}, found {name!r}")
    return Path(str(resources.files("cppo_diag.study").joinpath("presets", f"{name}.toml")))


def _read(path: Path) -> dict:
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
            if not isinstance(data, dict):
                raise StudyConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
            return data
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        if isinstance(exc, StudyConfigError):
            raise
        raise StudyConfigError(f"{path}: cannot parse: {exc}") from exc
    raise StudyConfigError(f"{path}: expected a .toml, .yaml or .yml file, found suffix {suffix!r}")


def _expect(cond: bool, fld: str, expected: str, found: Any, src: str) -> None:
    if not cond:
        raise StudyConfigError(f"{src}: field '{fld}': expected {expected}, found {found!r}")


def _known_rules() -> dict[str, dict] | None:
    """Registered rule name -> its parameters (name -> default)."""
    try:
        from cppo_diag.masks import list_rules
    except ImportError:  # rule library not importable: validated by the trainer instead
        return None
    return {spec.name: dict(spec.params) for spec in list_rules()}


# Trainer keys the study sets itself for every cell (from study.rules/seeds, trainer.steps and --root).
RESERVED_KEYS = ("rule.name", "rule.params", "seed", "steps", "log.out_dir", "log.name", "threads")


def _flatten_overrides(d: dict, fld: str, src: str, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}, "log.eval_every": 5}`` -> ``{"optim.lr": 1e-3, "log.eval_every": 5}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "rule.params":
            out.update(_flatten_overrides(v, fld, src, prefix=f"{key}."))
            continue
        _expect(
            key not in RESERVED_KEYS,
            f"{fld}.{key}",
            "no key the study sets itself (rule.name/seed: study.rules/seeds; steps: trainer.steps; "
            "rule.params: [rule_params.RULE]; log.out_dir/log.name: --root; threads: --threads)",
            key,
            src,
        )
        out[key] = v
    return out


def _check_rule_params(rule: str, params: dict, fld: str, rules: list, known: dict | None, src: str) -> None:
    _expect(rule in rules, fld, f"parameters of a rule in study.rules ({', '.join(rules)})", rule, src)
    if known is not None and rule in known:
        bad = sorted(set(params) - set(known[rule]))
        _expect(not bad, fld, f"parameters of {rule} ({', '.join(known[rule]) or 'none'})", bad, src)


def load_study(config_or_preset: str | Path, *, validate_rules: bool = True) -> StudyConfig:
    """Load a study from a preset name (:data:`PRESETS`) or a TOML/YAML path."""
    s = str(config_or_preset)
    path = preset_path(s) if s in PRESETS else Path(s)
    if not path.is_file():
        raise StudyConfigError(
            f"study config: expected a preset ({', '.join(PRESETS)}) or an existing TOML/YAML file, found {s!r}"
        )
    raw = _read(path)
    src = str(path)
    allowed_top = {"study", "trainer", "rule_params", "settings", "analysis"}
    unknown = sorted(set(raw) - allowed_top)
    _expect(not unknown, "<top level>", f"only sections {sorted(allowed_top)}", unknown, src)

    st = raw.get("study") or {}
    _expect(isinstance(st, dict), "study", "a table", st, src)
    name = st.get("name", path.stem)
    _expect(isinstance(name, str) and bool(_NAME_RE.match(name)), "study.name", "a simple name", name, src)
    rules = st.get("rules")
    _expect(
        isinstance(rules, list) and rules and all(isinstance(r, str) for r in rules),
        "study.rules",
        "a non-empty list of rule names",
        rules,
        src,
    )
    _expect(len(set(rules)) == len(rules), "study.rules", "no duplicates", rules, src)
    known = _known_rules() if validate_rules else None
    if known is not None:
        bad = [r for r in rules if r not in known]
        _expect(not bad, "study.rules", f"registered rules ({', '.join(known)})", bad, src)
    seeds = st.get("seeds", 5)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        _expect(seeds >= 1, "study.seeds", "a positive count or a list of ints", seeds, src)
        seeds = list(range(seeds))
    _expect(
        isinstance(seeds, list) and seeds and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds),
        "study.seeds",
        "a positive count or a non-empty list of ints",
        seeds,
        src,
    )
    _expect(len(set(seeds)) == len(seeds), "study.seeds", "no duplicates", seeds, src)

    tr = raw.get("trainer") or {}
    _expect(isinstance(tr, dict), "trainer", "a table", tr, src)
    unknown = sorted(set(tr) - {"preset", "config", "steps", "set"})
    _expect(not unknown, "trainer", "keys preset, config, steps, set", unknown, src)
    steps = tr.get("steps")
    _expect(isinstance(steps, int) and steps >= 1, "trainer.steps", "a positive int", steps, src)
    preset = tr.get("preset")
    _expect(preset is None or isinstance(preset, str), "trainer.preset", "a trainer preset name", preset, src)
    tconf = tr.get("config")
    if tconf is not None:
        _expect(isinstance(tconf, str), "trainer.config", "a path to a trainer config file", tconf, src)
        tpath = Path(tconf)
        if not tpath.is_absolute():  # relative to the study file
            tpath = (path.parent / tpath).resolve()
        tconf = str(tpath)
    overrides = tr.get("set") or {}
    _expect(isinstance(overrides, dict), "trainer.set", "a table of dotted-key overrides", overrides, src)
    overrides = _flatten_overrides(overrides, "trainer.set", src)

    rule_params = raw.get("rule_params") or {}
    _expect(isinstance(rule_params, dict), "rule_params", "a table per rule", rule_params, src)
    for r, p in rule_params.items():
        _expect(isinstance(p, dict), f"rule_params.{r}", "a table of rule keyword arguments", p, src)
        _check_rule_params(r, p, f"rule_params.{r}", rules, known, src)

    settings_raw = raw.get("settings") or [{}]
    _expect(isinstance(settings_raw, list), "settings", "an array of tables ([[settings]])", settings_raw, src)
    settings = []
    for i, sraw in enumerate(settings_raw):
        _expect(isinstance(sraw, dict), f"settings[{i}]", "a table", sraw, src)
        unknown = sorted(set(sraw) - {"name", "set", "rule_params"})
        _expect(not unknown, f"settings[{i}]", "keys name, set, rule_params", unknown, src)
        sname = sraw.get("name", "")
        if len(settings_raw) > 1:
            _expect(
                isinstance(sname, str) and bool(_NAME_RE.match(sname)),
                f"settings[{i}].name",
                "a simple unique name (several settings)",
                sname,
                src,
            )
        sset = sraw.get("set") or {}
        _expect(isinstance(sset, dict), f"settings[{i}].set", "a table of dotted-key overrides", sset, src)
        sset = _flatten_overrides(sset, f"settings[{i}].set", src)
        srp = sraw.get("rule_params") or {}
        _expect(isinstance(srp, dict), f"settings[{i}].rule_params", "a table per rule", srp, src)
        for r, p in srp.items():
            _expect(isinstance(p, dict), f"settings[{i}].rule_params.{r}", "a table of rule keyword arguments", p, src)
            _check_rule_params(r, p, f"settings[{i}].rule_params.{r}", rules, known, src)
        settings.append(Setting(name=sname, overrides=dict(sset), rule_params=copy.deepcopy(srp)))
    names = [s.name for s in settings]
    _expect(len(set(names)) == len(names), "settings[].name", "unique names", names, src)

    an = raw.get("analysis") or {}
    _expect(isinstance(an, dict), "analysis", "a table", an, src)
    defaults = AnalysisConfig()
    known_an = set(AnalysisConfig.__dataclass_fields__)
    unknown = sorted(set(an) - known_an)
    _expect(not unknown, "analysis", f"keys {sorted(known_an)}", unknown, src)
    if "ablation_rules" in an:
        an = {**an, "ablation_rules": tuple(an["ablation_rules"])}
    analysis = AnalysisConfig(**{**defaults.__dict__, **an})
    _expect(analysis.primary in ("best", "final"), "analysis.primary", "'best' or 'final'", analysis.primary, src)
    _expect(
        isinstance(analysis.final_window, int) and not isinstance(analysis.final_window, bool)
        and analysis.final_window >= 1,
        "analysis.final_window",
        "a positive int (evaluations averaged into final_acc)",
        analysis.final_window,
        src,
    )
    _expect(
        isinstance(analysis.threshold, (int, float)) and math.isfinite(analysis.threshold),
        "analysis.threshold",
        "a number",
        analysis.threshold,
        src,
    )
    _expect(0 < analysis.confidence < 1, "analysis.confidence", "a value in (0, 1)", analysis.confidence, src)

    return StudyConfig(
        name=name,
        description=str(st.get("description", "")),
        rules=tuple(rules),
        seeds=tuple(seeds),
        steps=steps,
        trainer_preset=preset,
        trainer_config=tconf,
        overrides=dict(overrides),
        rule_params=copy.deepcopy(rule_params),
        settings=tuple(settings),
        analysis=analysis,
        source=src,
        raw=raw,
    )
