"""The ``aurora-dbx`` command line: whoami, check, plan, audit, demo.

Exit status 0 on success; non-zero with a one-line reason on stderr on failure. Output
never contains a token or secret (every line passes through the scrubber).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .errors import AuroraDbxError
from .redaction import install_log_redaction, scrub

__all__ = ["main"]


def _out(text: str) -> None:
    sys.stdout.write(scrub(text) + "\n")


def _context(args: argparse.Namespace) -> Any:
    from .context import configure

    return configure(policy=args.policy)


def cmd_whoami(args: argparse.Namespace) -> int:
    ctx = _context(args)
    me = ctx.whoami()
    roles = [ctx.policy.roles[r] for r in me.roles]
    if args.format == "json":
        _out(json.dumps({
            "principal": me.name, "principal_type": me.kind, "groups": list(me.groups),
            "resolver": me.resolver, "job_id": me.job_id, "run_id": me.run_id,
            "roles": [{"role": r.name, "cluster": r.cluster, "iam_role_arn": r.iam_role_arn,
                       "db_user": r.db_user, "access": r.access, "tables": [p.text for p in r.tables]}
                      for r in roles],
        }, indent=2))
        return 0
    _out(f"principal:  {me.name} ({me.kind}, via {me.resolver})")
    _out(f"groups:     {', '.join(me.groups) or '-'}")
    if not roles:
        _out(f"roles:      none: no binding in {ctx.policy.source} names you or your groups")
    for r in roles:
        verb = "read+write" if r.access == "write" else "read"
        _out(f"role:       {r.name} -> {r.db_user}@{r.cluster} ({verb}) {', '.join(p.text for p in r.tables)}")
        _out(f"            {r.iam_role_arn}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .checks import check_roles

    ctx = _context(args)
    me = ctx.whoami()
    results = check_roles(ctx)
    if args.format == "json":
        _out(json.dumps({"principal": me.name, "principal_type": me.kind,
                         "ok": bool(results) and all(r.ok for r in results),
                         "roles": [r.as_dict() for r in results]}, indent=2))
    else:
        _out(f"checking {len(results)} role(s) bound to {me.kind} {me.name}")
        for r in results:
            _out(f"{'OK  ' if r.ok else 'FAIL'} {r.role} ({r.db_user}@{r.cluster})")
            for s in r.steps:
                _out(f"     {'ok  ' if s['ok'] else 'FAIL'} {s['step']:<12} {s['ms']:>8.1f} ms  {s['detail']}")
    if not results:
        print(f"aurora-dbx: no roles are bound to {me.kind} {me.name} in {ctx.policy.source}", file=sys.stderr)
        return 1
    failed = [r for r in results if not r.ok]
    if failed:
        first = next(s for s in failed[0].steps if not s["ok"])
        print(scrub(f"aurora-dbx: {len(failed)} of {len(results)} role(s) failed; "
                    f"{failed[0].role}: {first['step']}: {first['detail']}"), file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aurora-dbx",
        description="Aurora access from Databricks through IAM roles and short-lived tokens.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, fn: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--policy", help="access policy file (default: $AURORA_DBX_POLICY)")
        p.add_argument("--format", choices=("text", "json"), default="text")
        p.set_defaults(fn=fn)
        return p

    add("whoami", "show the principal, its groups and its bound roles", cmd_whoami)
    add("check", "assume every bound role, mint a token, connect and SELECT 1", cmd_check)
    for extra in _extra_commands():
        extra(add)
    return parser


def _extra_commands() -> list[Any]:
    """Commands living in their own modules (plan, audit, demo) register here."""
    commands = []
    for module in ("aurora_dbx.plan", "aurora_dbx.audit_cli", "aurora_dbx.demo"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        commands.append(mod.register)
    return commands


def main(argv: Sequence[str] | None = None) -> int:
    install_log_redaction()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except AuroraDbxError as e:
        print(f"aurora-dbx: {scrub(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aurora-dbx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
