"""List the trust-region rules cppo-diag implements, with their parameters, defaults and paper equations.

Every rule is computed by ``cppo_diag.masks.compute_mask(rule, *, logp, logp_rollout, advantages, ...,
**params)``; this command prints exactly the registry that function uses, so what you read here is what runs.

Examples:
  cppo-diag rules                      all rules, human-readable
  cppo-diag rules cppo dppo            only these rules
  cppo-diag rules --format json        machine-readable (name, family, equation, params, defaults, reasons)
  cppo-diag rules --format markdown    a Markdown table per rule (used for docs/rules.md)
"""

from __future__ import annotations

import dataclasses

import json
import textwrap

HELP = "list the trust-region rules with their parameters, defaults and paper equations"


def add_arguments(parser) -> None:
    parser.add_argument("names", nargs="*", metavar="RULE", help="rules to show (default: all)")
    parser.add_argument(
        "--format", choices=("text", "json", "markdown"), default="text",
        help="output format (default: text)",
    )


def _facts(spec) -> str:
    """The rule's declared facts in words (``RuleFacts``, masks/registry.py)."""
    f = spec.facts
    return (f"can mask: {'yes' if f.can_mask else 'no'}; prefix budget: {'yes' if f.prefix_budget else 'no'}; "
            f"threshold: {f.threshold}; loss form: {f.loss_form}")


def _as_dict(spec) -> dict:
    from cppo_diag.masks import PARAMETERS

    return {
        "name": spec.name,
        "family": spec.family,
        "equation": spec.equation,
        "reasons": list(spec.reasons),
        "facts": dataclasses.asdict(spec.facts),
        "doc": spec.doc,
        "params": [
            {
                "name": p,
                "default": d,
                "default_note": spec.default_notes.get(p),
                "meaning": PARAMETERS[p],
            }
            for p, d in spec.params.items()
        ],
    }


def _text(specs) -> str:
    out = []
    for s in specs:
        out.append(f"{s.name}  [{s.family}]")
        out.append(textwrap.indent(textwrap.fill(s.equation, 100), "    "))
        out.append(f"    reasons: {', '.join(s.reasons)}")
        out.append(f"    facts: {_facts(s)}")
        if s.params:
            width = max(len(p) for p in s.params)
            for p in s.params:
                out.append(f"    {p:<{width}} = {s.describe_default(p)}")
        else:
            out.append("    (no parameters)")
        out.append("")
    from cppo_diag.masks import COMMON_PARAMETERS

    out.append("every rule also takes: " + "; ".join(f"{k} ({v})" for k, v in COMMON_PARAMETERS.items()))
    return "\n".join(out)


def _markdown(specs) -> str:
    from cppo_diag.masks import PARAMETERS

    out = []
    for s in specs:
        out.append(f"### `{s.name}`\n\n{s.equation}\n\nReasons: {', '.join(s.reasons)}\n\nFacts: {_facts(s)}\n")
        if s.params:
            out.append("| parameter | default | meaning |\n|---|---|---|")
            for p in s.params:
                out.append(f"| `{p}` | {s.describe_default(p)} | {PARAMETERS[p]} |")
        out.append("")
    return "\n".join(out)


def run(args) -> int:
    import sys

    from cppo_diag.masks import UnknownRuleError, get_rule, list_rules

    try:
        specs = [get_rule(n) for n in args.names] if args.names else list_rules()
    except UnknownRuleError as exc:
        print(f"cppo-diag rules: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps([_as_dict(s) for s in specs], indent=2))
    elif args.format == "markdown":
        print(_markdown(specs))
    else:
        print(_text(specs))
    return 0
