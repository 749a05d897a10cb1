"""ctrl-exec operator CLI (SPEC §7): `python ctrlexec.py [--config PATH] [--json] <command>`.

Owns: the operator commands (setup-ca, setup-dispatcher, pairing-mode, list-requests,
approve, deny, enroll, list-agents, unpair, run, ping, discovery, status, wait,
cancel, runs, renew, rotate-dispatcher, revoke, audit verify, list-locks, purge), their argument parsing, the human output (aligned tables,
per-host blocks, a live progress line on a TTY), the `--json` output and the exit
codes: 0 all hosts succeeded, 1 some host failed (or a thing named was not found),
2 usage or config error, 3 auth denied, 4 lock conflict.

Never does: talk to agents itself (engine.py), decide auth (auth.py; with no hook
the CLI is allowed), touch state files directly (store.py), make keys or
certificates (pki.py), or print / store a token or a private key. A run record
holds the submitter's username and 127.0.0.1, never the token.

Global options (--config, --json) may come before or after the command. For `run`,
the last word before `--` is the script; everything after `--` is passed to the
script verbatim, even words that look like options.
"""

# gevent must patch before anything else is imported: the engine's fan-out uses
# greenlets, and unpatched sockets / time.sleep would serialise it.
from gevent import monkey; monkey.patch_all()  # noqa: E402,E702

__all__ = [
    "CliError",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_DENIED",
    "EXIT_LOCKED",
    "main",
]

import argparse
import datetime
import os
import re
import sys
import time
from typing import Any, Callable, Optional

import ujson

import audit
import config as config_mod
import ctrlexec_agent as wire
import engine as engine_mod
import lifecycle
import pairing
import pki
import service as service_mod
import store as store_mod
import workers as workers_mod

# --- constants -------------------------------------------------------------------------

PROG = "ctrlexec.py"
LOG_IDENT = "ctrl-exec-dispatcher"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DENIED = 3
EXIT_LOCKED = 4
EXIT_INTERRUPTED = 130
#: The CLI runs on the control host itself: the auth hook sees this as the source.
CLI_SOURCE_IP = "127.0.0.1"
WAIT_TIMEOUT_S = 300
#: How often `wait` re-reads and re-aggregates a run.
WAIT_POLL_S = 2.0
TOKEN_ENV = "ENVEXEC_TOKEN"
_TAG_ITEM_RE = re.compile(r"^([^=,\s]+)=([^,]*)$")
#: Control characters neutralised in human output on a terminal (escape-sequence
#: injection from remote script output); newline and tab are kept.
_TERMINAL_UNSAFE_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

COMMAND_SUMMARY = """commands:
  setup-ca                       create the CA (ca.key 0600, ca.crt) in ca_dir
  setup-dispatcher [--yes]       issue the dispatcher certificate (cert / key)
  pairing-mode [--port N] [--timeout S] [--bind ADDR]
                                 accept pairing requests from agents
  list-requests                  pending pairing requests
  approve REQID [--lookup-by ip|hostname] [--ip ADDR] [--agent-port N]
  deny REQID
  enroll NAME --address ADDR [--port N] [--tags k=v,...] --out DIR
                                 write an agent bundle and register NAME
  list-agents [--tags k=v,...]   registered agents
  unpair NAME                    remove NAME from the registry
  run HOST... SCRIPT [-- ARGS...] [--async] [--follow] [--timeout N]
  ping HOST... [--no-renew]      check agents (status, rtt, cert expiry, days left, version);
                                 renews certificates under agent_renew_days, warns under 30
  discovery [HOST...]            scripts and tags of agents (all by default)
  status REQID                   a stored run (async runs are refreshed)
  wait REQID [--timeout N]       wait for an async run to complete
  renew HOST... | --all          renew agent certificates over mTLS (the agent keeps serving)
  rotate-dispatcher [--finish]   new dispatcher certificate, pushed to every agent's trust map
  revoke NAME                    remove NAME and refuse its certificate and key from now on
  audit verify [--file PATH]     check the audit log's hash chain (rotated files included)
  list-locks                     host+script locks currently held
  purge                          delete run records past run_retention

exit codes: 0 all hosts succeeded, 1 some host failed, 2 usage or config error,
3 auth denied, 4 lock conflict (wait: 2 = timed out)"""


# --- exceptions --------------------------------------------------------------------------

class CliError(Exception):
    """A command failed in a way the operator must see: one line and an exit code.

    Attributes: code (exit code); body (the --json object, default
    {"ok": false, "error": error, "detail": message}); message (the stderr line).
    """

    def __init__(self, message: str, *, code: int = EXIT_FAILED, error: str = "error",
                 body: Optional[dict] = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.body = body if body is not None else {"ok": False, "error": error,
                                                   "detail": message}


# --- public API ----------------------------------------------------------------------------

def main(argv: Optional[list] = None) -> int:
    """Run one CLI command; returns the exit code (see the module docstring).

    Args: argv without the program name (default sys.argv[1:]).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse_args(argv)
    except SystemExit as exc:       # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    wire.setup_logging(LOG_IDENT, stderr_level="warning")
    try:
        try:
            cfg = config_mod.load(args.config)
        except config_mod.ConfigError as exc:
            raise CliError(str(exc), code=EXIT_USAGE, error="config error") from None
        try:
            return args.handler(_Context(cfg, args))
        except (service_mod.ServiceError, store_mod.StoreError, engine_mod.EngineError) as exc:
            raise _outcome_error(exc) from None
    except CliError as exc:
        return _report_error(args, exc)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED


# --- private ----------------------------------------------------------------------------

class _Context:
    """What a command handler needs: cfg, parsed args, and the store / engine on demand."""

    def __init__(self, cfg: Any, args: argparse.Namespace) -> None:
        self.cfg = cfg
        self.args = args
        self.json = bool(args.json)
        self._store = None
        self._service = None

    @property
    def store(self) -> Any:
        """store.Store of cfg (state directories created); CliError(2) when unusable."""
        if self._store is None:
            try:
                self._store = store_mod.open_store(self.cfg)
            except store_mod.StoreError as exc:
                raise CliError(str(exc), code=EXIT_USAGE, error="config error") from None
        return self._store

    def engine(self) -> Any:
        """engine.Engine of cfg; CliError(2) when the dispatcher identity cannot be loaded."""
        for name in ("cert", "key", "ca"):
            path = getattr(self.cfg, name)
            if not path or not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise CliError("%s %s is missing or unreadable (run `ctrlexec.py setup-ca` and "
                               "`setup-dispatcher`, or set %s in ctrl-exec.conf)"
                               % (name, path, name), code=EXIT_USAGE, error="config error")
        try:
            return workers_mod.engine_from_config(self.cfg)
        except engine_mod.EngineError as exc:
            raise CliError(str(exc), code=EXIT_USAGE, error="config error") from None

    def credentials(self) -> tuple:
        """(username, token): --username / $USER and --token / $ENVEXEC_TOKEN."""
        username = getattr(self.args, "username", None)
        token = getattr(self.args, "token", None)
        if username is None:
            username = os.environ.get("USER", "")
        if token is None:
            token = os.environ.get(TOKEN_ENV, "")
        return username, token

    def service(self) -> Any:
        """service.Service for the CLI; the engine is built only when an agent is asked."""
        if self._service is None:
            self._service = service_mod.Service(
                self.cfg, self.store, _LazyEngine(self.engine), caller="cli",
                warn=lambda text: sys.stderr.write("warning: %s\n" % text))
        return self._service

    def request(self, **fields: Any) -> dict:
        """A request in the API's body shape, with the CLI's credentials added."""
        username, token = self.credentials()
        return dict(fields, username=username, token=token)


class _LazyEngine:
    """An engine built on first use: commands that ask no agent need no dispatcher identity."""

    def __init__(self, build: Callable) -> None:
        self._build = build
        self._engine = None

    def __getattr__(self, name: str) -> Any:
        if self._engine is None:
            self._engine = self._build()
        return getattr(self._engine, name)


# --- argument parsing ---

def _parse_args(argv: list) -> argparse.Namespace:
    """Two stages: global options + command name, then the command's own parser.

    The command parser also accepts the global options, so `list-agents --json`
    works; everything after the first `--` of a `run` is the script's arguments.
    """
    top = argparse.ArgumentParser(
        prog=PROG, description="ctrl-exec operator CLI: run allowlisted scripts on agents "
        "over mutual TLS, manage the CA, pairing and the agent registry.",
        epilog=COMMAND_SUMMARY, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_global_options(top, suppress=False)
    top.add_argument("--version", action="version", version="%s %s" % (LOG_IDENT, wire.VERSION))
    top.add_argument("command", nargs="?", choices=sorted(_COMMANDS), metavar="COMMAND",
                     help="one of the commands below")
    top.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = top.parse_args(argv)
    if args.command is None:
        top.error("a COMMAND is required (see --help)")
    handler, build = _COMMANDS[args.command]
    sub = argparse.ArgumentParser(prog="%s %s" % (PROG, args.command))
    _add_global_options(sub, suppress=True)
    build(sub)
    rest = list(args.rest)
    script_args = []
    if args.command == "run" and "--" in rest:
        cut = rest.index("--")
        rest, script_args = rest[:cut], rest[cut + 1:]
    sub_args = sub.parse_intermixed_args(rest)
    for key, value in vars(sub_args).items():
        setattr(args, key, value)
    args.json = bool(args.json)
    args.script_args = script_args
    args.handler = handler
    return args


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--config and --json; on command parsers they only override when given."""
    parser.add_argument("--config", metavar="PATH",
                        default=argparse.SUPPRESS if suppress else None,
                        help="ctrl-exec.conf (default: $CTRL_EXEC_CONF, then "
                             "/etc/ctrl-exec/ctrl-exec.conf)")
    parser.add_argument("--json", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="machine-readable JSON output")


def _add_credentials(parser: argparse.ArgumentParser) -> None:
    """--username / --token, passed to the auth hook (never stored or logged)."""
    parser.add_argument("--username", metavar="U", default=None,
                        help="user name for the auth hook (default: $USER)")
    parser.add_argument("--token", metavar="T", default=None,
                        help="token for the auth hook (default: $%s; prefer the variable, "
                             "command lines are visible to other local users)" % TOKEN_ENV)


def _integer(text: str) -> int:
    """argparse type: an integer (any sign; the service checks the range)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not an integer" % text) from None


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("%r is not a positive integer" % text)
    return value


def _port(text: str) -> int:
    """argparse type: a TCP port 1-65535."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("%r is not a port (1-65535 accepted)" % text)
    return value


def _build_none(parser: argparse.ArgumentParser) -> None:
    """Commands without options of their own."""


def _build_setup_dispatcher(parser: argparse.ArgumentParser) -> None:
    """setup-dispatcher [--yes]."""
    parser.add_argument("--yes", action="store_true",
                        help="replace the certificate even though agents are registered")


def _build_pairing_mode(parser: argparse.ArgumentParser) -> None:
    """pairing-mode [--port N] [--timeout S] [--bind ADDR]."""
    parser.add_argument("--port", type=_port, default=wire.PAIRING_PORT)
    parser.add_argument("--timeout", type=_positive_int, default=None,
                        help="seconds, 1-600 (default: pairing_timeout, 600)")
    parser.add_argument("--bind", metavar="ADDR", default="0.0.0.0")


def _build_reqid(parser: argparse.ArgumentParser) -> None:
    """One REQID positional (deny, status)."""
    parser.add_argument("reqid", metavar="REQID")


def _build_approve(parser: argparse.ArgumentParser) -> None:
    """approve REQID [--lookup-by ip|hostname] [--ip ADDR] [--agent-port N]."""
    _build_reqid(parser)
    parser.add_argument("--lookup-by", choices=("ip", "hostname"), default=None)
    parser.add_argument("--ip", metavar="ADDR", default=None)
    parser.add_argument("--agent-port", type=_port, default=None)


def _build_enroll(parser: argparse.ArgumentParser) -> None:
    """enroll NAME --address ADDR [--port N] [--tags k=v,...] --out DIR."""
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("--address", metavar="ADDR", required=True)
    parser.add_argument("--port", type=_port, default=wire.AGENT_PORT)
    parser.add_argument("--tags", metavar="k=v,...", default="")
    parser.add_argument("--out", metavar="DIR", required=True)


def _build_list_agents(parser: argparse.ArgumentParser) -> None:
    """list-agents [--tags k=v,...]."""
    parser.add_argument("--tags", metavar="k=v,...", default="")


def _build_name(parser: argparse.ArgumentParser) -> None:
    """One NAME positional (unpair)."""
    parser.add_argument("name", metavar="NAME")


def _build_run(parser: argparse.ArgumentParser) -> None:
    """run HOST... SCRIPT [--async] [--follow] [--timeout N] (script args split off earlier)."""
    parser.usage = ("%(prog)s [options] HOST... SCRIPT [-- ARGS...]\n"
                    "  (the last word before -- is the script; ARGS are passed verbatim)")
    parser.add_argument("words", nargs="+", metavar="WORD", help="HOST... then SCRIPT")
    parser.add_argument("--async", dest="async_", action="store_true",
                        help="start detached runs and return at once with the reqid")
    parser.add_argument("--follow", action="store_true",
                        help="print output lines as they arrive (with --json: NDJSON events, "
                             "then a final \"done\" event)")
    # An integer here; whether it is a valid run timeout is service.validate_run's word.
    parser.add_argument("--timeout", type=_integer, default=None,
                        help="seconds after which the agent kills the script")
    _add_targets(parser)
    parser.add_argument("--max-concurrency", metavar="N|P%", default=None,
                        help="hosts in flight at once (a number or a percentage, rounded up)")
    parser.add_argument("--max-errors", metavar="N|P%", default=None,
                        help="errors (non-zero exits included) allowed before no new host "
                             "starts (a number or a percentage, rounded down)")
    parser.add_argument("--batch-wait", metavar="SECONDS", type=float, default=None,
                        help="pause between batches of --max-concurrency hosts")
    parser.add_argument("--cancel-on-interrupt", action="store_true",
                        help="Ctrl-C cancels the run on the agents without asking")
    _add_credentials(parser)


def _add_targets(parser: argparse.ArgumentParser) -> None:
    """--tags k=v[,k=v...] (a value a|b means any of): select agents by tag."""
    parser.add_argument("--tags", metavar="k=v,...", default="",
                        help="agents whose tags match all of these (k=a|b: any of a, b)")


def _build_hosts(parser: argparse.ArgumentParser) -> None:
    """[HOST...] [--tags ...] plus credentials (ping)."""
    parser.add_argument("hosts", nargs="*", metavar="HOST")
    _add_targets(parser)
    _add_credentials(parser)


def _build_ping(parser: argparse.ArgumentParser) -> None:
    """ping [HOST...] [--tags ...] [--no-renew] plus credentials."""
    _build_hosts(parser)
    parser.add_argument("--no-renew", action="store_true",
                        help="do not renew certificates with fewer than agent_renew_days left")


def _build_discovery(parser: argparse.ArgumentParser) -> None:
    """[HOST...] [--tags ...] plus credentials (discovery)."""
    parser.add_argument("hosts", nargs="*", metavar="HOST")
    _add_targets(parser)
    _add_credentials(parser)


def _build_cancel(parser: argparse.ArgumentParser) -> None:
    """cancel REQID [--grace N]."""
    _build_reqid(parser)
    parser.add_argument("--grace", type=_positive_int, default=5,
                        help="seconds between TERM and KILL (1-60, default 5)")
    _add_credentials(parser)


def _build_runs(parser: argparse.ArgumentParser) -> None:
    """runs [--script S] [--host H] [--user U] [--state ST] [--since EPOCH] [--limit N]."""
    for name in ("script", "host", "user", "state", "since", "limit", "offset"):
        parser.add_argument("--" + name, default=None)


def _build_renew(parser: argparse.ArgumentParser) -> None:
    """renew HOST... | --all | --tags k=v,..."""
    parser.add_argument("hosts", nargs="*", metavar="HOST")
    parser.add_argument("--all", action="store_true", help="every registered agent")
    _add_targets(parser)


def _build_audit(parser: argparse.ArgumentParser) -> None:
    """audit verify [--file PATH]."""
    parser.add_argument("verb", choices=("verify",), metavar="verify")
    parser.add_argument("--file", metavar="PATH", default=None,
                        help="the audit log (default: audit_log, <state_dir>/audit.log)")


def _build_rotate_dispatcher(parser: argparse.ArgumentParser) -> None:
    """rotate-dispatcher [--finish]."""
    parser.add_argument("--finish", action="store_true",
                        help="give up on agents still pending (they need re-pairing) and delete "
                             "the previous dispatcher key")


def _build_wait(parser: argparse.ArgumentParser) -> None:
    """wait REQID [--timeout N]."""
    _build_reqid(parser)
    parser.add_argument("--timeout", type=_positive_int, default=WAIT_TIMEOUT_S,
                        help="seconds to wait (default %d)" % WAIT_TIMEOUT_S)
    parser.add_argument("--cancel-on-interrupt", action="store_true",
                        help="Ctrl-C cancels the run on the agents without asking")


# --- PKI and registry commands ---

def _cmd_setup_ca(ctx: _Context) -> int:
    """setup-ca: create ca.key / ca.crt; refuses when a CA already exists."""
    _pki_call(pki.create_ca, ctx.cfg.ca_dir)
    ca_crt = os.path.join(ctx.cfg.ca_dir, "ca.crt")
    wire.log_action("info", "setup-ca", ca_dir=ctx.cfg.ca_dir)
    if ctx.json:
        _print_json({"ok": True, "ca_dir": ctx.cfg.ca_dir, "ca": ca_crt})
    else:
        _out("CA created: %s (key %s, mode 0600)"
             % (ca_crt, os.path.join(ctx.cfg.ca_dir, "ca.key")))
        _out("next: %s setup-dispatcher" % PROG)
    return EXIT_OK


def _cmd_setup_dispatcher(ctx: _Context) -> int:
    """setup-dispatcher: issue cert / key; asks first when agents trust the current serial."""
    count = len(ctx.store.registry.names())
    if count and os.path.exists(ctx.cfg.cert) and not ctx.args.yes:
        warning = ("%d agent(s) are registered and trust the current dispatcher certificate's "
                   "serial; a new certificate changes it and those agents will refuse this "
                   "dispatcher until their trusted-dispatcher map is updated" % count)
        if not sys.stdin.isatty():
            raise CliError(warning + "; re-run with --yes to replace it anyway",
                           code=EXIT_USAGE, error="confirmation required")
        sys.stderr.write("%s.\nReplace %s? [y/N] " % (warning, ctx.cfg.cert))
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise CliError("Aborted: the dispatcher certificate was not changed",
                           code=EXIT_FAILED, error="aborted")
    serial = _pki_call(pki.create_dispatcher_cert, ctx.cfg.ca_dir, ctx.cfg.cert, ctx.cfg.key)
    wire.log_action("info", "setup-dispatcher", cert=ctx.cfg.cert, serial=serial)
    if ctx.json:
        _print_json({"ok": True, "cert": ctx.cfg.cert, "key": ctx.cfg.key, "serial": serial})
    else:
        _out("dispatcher certificate written: %s (key %s, mode 0600), serial %s"
             % (ctx.cfg.cert, ctx.cfg.key, serial))
    return EXIT_OK


def _cmd_pairing_mode(ctx: _Context) -> int:
    """pairing-mode: run the pairing listener in the foreground."""
    args = ctx.args
    timeout = args.timeout if args.timeout is not None else ctx.cfg.pairing_timeout
    return _pki_call(pairing.run_pairing_mode, ctx.cfg, ctx.store.registry, port=args.port,
                     timeout=timeout, bind=args.bind, interactive=sys.stdin.isatty())


def _cmd_list_requests(ctx: _Context) -> int:
    """list-requests: pending pairing requests, oldest first."""
    rows = _pki_call(pairing.list_requests, ctx.cfg)
    if ctx.json:
        _print_json(rows)
        return EXIT_OK
    if not rows:
        _out("no pending pairing requests")
        return EXIT_OK
    _print_table(("ID", "HOSTNAME", "SOURCE IP", "CODE", "RECEIVED"),
                 [(r.get("id"), r.get("hostname"), r.get("source_ip"), r.get("code"),
                   r.get("received")) for r in rows])
    return EXIT_OK


def _cmd_approve(ctx: _Context) -> int:
    """approve REQID: sign the queued CSR and register the agent."""
    args = ctx.args
    _require_pending(ctx, args.reqid)
    record = _pki_call(pairing.approve, ctx.cfg, ctx.store.registry, args.reqid,
                       lookup_by=args.lookup_by, ip=args.ip, agent_port=args.agent_port)
    if ctx.json:
        _print_json({"ok": True, "reqid": args.reqid, "agent": record})
    else:
        _out("approved %s: %s, port %s, lookup by %s; certificate expires %s"
             % (record.get("hostname"), record.get("ip") or "(no ip)", record.get("port"),
                record.get("lookup_by"), record.get("expiry")))
    return EXIT_OK


def _cmd_deny(ctx: _Context) -> int:
    """deny REQID: refuse a queued pairing request."""
    _require_pending(ctx, ctx.args.reqid)
    _pki_call(pairing.deny, ctx.cfg, ctx.args.reqid)
    if ctx.json:
        _print_json({"ok": True, "reqid": ctx.args.reqid, "status": "denied"})
    else:
        _out("denied pairing request %s" % ctx.args.reqid)
    return EXIT_OK


def _cmd_enroll(ctx: _Context) -> int:
    """enroll NAME: write an agent bundle to --out and register NAME."""
    args = ctx.args
    tags = _parse_tags(args.tags)
    record = _pki_call(pki.enroll, ctx.cfg, ctx.store.registry, args.name,
                       address=args.address, port=args.port, tags=tags, out_dir=args.out)
    if ctx.json:
        _print_json({"ok": True, "name": args.name, "out": args.out, "agent": record})
    else:
        _out("enrolled %s at %s:%s; certificate expires %s"
             % (args.name, record.get("ip"), record.get("port"), record.get("expiry")))
        _out("bundle in %s; allowlist scripts in %s, then start the agent with:"
             % (args.out, os.path.join(args.out, "scripts.conf")))
        _out("  python ctrlexec_agent.py serve --config %s"
             % os.path.join(args.out, "agent.conf"))
    return EXIT_OK


def _cmd_list_agents(ctx: _Context) -> int:
    """list-agents: the registry (exact AND match on --tags)."""
    records = ctx.store.registry.list(_parse_tags(ctx.args.tags) or None)
    if ctx.json:
        _print_json(records)
        return EXIT_OK
    if not records:
        _out("no agents registered" + (" with tags %s" % ctx.args.tags if ctx.args.tags else ""))
        return EXIT_OK
    rows = []
    for rec in records:
        tags = rec.get("tags") if isinstance(rec.get("tags"), dict) else {}
        rows.append((rec.get("name"), rec.get("ip"), rec.get("port"), rec.get("lookup_by"),
                     rec.get("paired"), rec.get("expiry"), _days_left(rec.get("expiry")),
                     ",".join("%s=%s" % kv for kv in sorted(tags.items()))))
    _print_table(("HOSTNAME", "IP", "PORT", "LOOKUP", "PAIRED", "CERT EXPIRY", "DAYS LEFT",
                  "TAGS"), rows)
    return EXIT_OK


def _cmd_unpair(ctx: _Context) -> int:
    """unpair NAME: delete the registry record (the agent's certificate stays valid)."""
    name = ctx.args.name
    registry = ctx.store.registry
    try:
        record = registry.get(name)
    except store_mod.CorruptRecord:
        record = {}                 # a corrupt record is still removable
    if record is None or not registry.delete(name):
        raise CliError("no agent named %s (see `%s list-agents`)" % (name, PROG),
                       error="not found")
    expiry = record.get("expiry") or "its expiry"
    wire.log_action("info", "unpair", agent=name)
    if ctx.json:
        _print_json({"ok": True, "name": name, "expiry": record.get("expiry", "")})
    else:
        _out("unpaired %s" % name)
    sys.stderr.write("warning: the certificate of %s stays valid until %s; remove this "
                     "dispatcher from the agent's ctrl-exec-dispatchers (or revoke its serial) "
                     "to stop it trusting this control host\n" % (name, expiry))
    return EXIT_OK


# --- fleet commands ---

def _cmd_run(ctx: _Context) -> int:
    """run HOST... SCRIPT [-- ARGS...]: sync (locks held), --follow, or --async."""
    args = ctx.args
    if args.async_ and args.follow:
        raise _usage("--async and --follow cannot be combined (use one of them)")
    words = args.words
    if len(words) < (1 if args.tags else 2):
        raise _usage("run needs at least one HOST (or --tags) and then a SCRIPT: "
                     "run HOST... SCRIPT [-- ARGS...]")
    fields = {"script": words[-1], "args": list(args.script_args), "async": bool(args.async_)}
    if words[:-1] or not args.tags:
        fields["hosts"] = words[:-1]
    if args.tags:
        fields["targets"] = {"tags": _tag_selector(args.tags)}
    if args.timeout is not None:
        fields["timeout"] = args.timeout
    for name in ("max_concurrency", "max_errors"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = int(value) if value.isdigit() else value
    if args.batch_wait is not None:
        fields["batch_wait"] = args.batch_wait
    req = service_mod.validate_run(ctx.request(**fields), max_hosts=ctx.cfg.max_hosts)
    mode = "async" if args.async_ else "follow" if args.follow else "sync"
    runs = ctx.service()
    plan = runs.plan_run(req, source_ip=CLI_SOURCE_IP, mode=mode)
    if args.async_:
        return _print_async_submit(ctx, plan.reqid, runs.submit(plan))
    follower = _Follower(json_lines=ctx.json) if args.follow else None
    progress = None
    if follower is None and len(plan.hosts) > 1 and _isatty(sys.stderr):
        progress = _Progress(len(plan.hosts))
    listener = follower or progress
    try:
        results = runs.run(plan, on_event=listener.event if listener is not None else None)
    except KeyboardInterrupt:
        _offer_cancel(ctx, plan.reqid)
        raise
    finally:
        if progress is not None:
            progress.clear()
    ok = all(_row_ok(row) for row in results)
    if follower is not None:
        follower.flush()
    if ctx.json:
        body = {"ok": ok, "reqid": plan.reqid, "results": results}
        if follower is not None:
            _out(_json_text(dict({"event": "done"}, **body), pretty=False))
        else:
            _print_json(body)
    else:
        for row in results:
            _print_run_row(row, plan.reqid, with_output=follower is None)
    return EXIT_OK if ok else EXIT_FAILED


def _cmd_ping(ctx: _Context) -> int:
    """ping HOST...: table HOST/STATUS/RTT/CERT EXPIRY/VERSION."""
    req = service_mod.validate_ping(ctx.request(**_host_fields(ctx.args)),
                                    max_hosts=ctx.cfg.max_hosts)
    reqid, results = ctx.service().ping(req, source_ip=CLI_SOURCE_IP)
    _renew_due(ctx, results)
    ok = all(row.get("status") == "ok" for row in results)
    if ctx.json:
        _print_json({"ok": ok, "reqid": reqid, "results": results})
        return EXIT_OK if ok else EXIT_FAILED
    _print_table(("HOST", "STATUS", "RTT", "CERT EXPIRY", "VERSION", "DAYS LEFT"),
                 [(row.get("host"), row.get("status"), row.get("rtt"), row.get("expiry"),
                   row.get("version"),
                   "" if row.get("days_left") is None else row.get("days_left"))
                  for row in results])
    for row in results:
        if row.get("status") != "ok":
            _out("ERROR %s: %s" % (row.get("host"), row.get("error") or "no answer"))
    return EXIT_OK if ok else EXIT_FAILED


def _renew_due(ctx: _Context, results: list) -> None:
    """ping: renew agents with fewer than agent_renew_days left (CLI only: it reads the CA
    key), then warn about every certificate still under lifecycle.WARN_DAYS days."""
    due = [row["host"] for row in results if lifecycle.renewal_due(row, ctx.cfg.agent_renew_days)]
    if due and not ctx.args.no_renew:
        try:
            renewed = lifecycle.renew(ctx.cfg, ctx.store.registry, ctx.engine(), due)
            _audit_rows(ctx, "renew", renewed)
        except lifecycle.LifecycleError as exc:
            sys.stderr.write("warning: cannot renew %s: %s\n" % (", ".join(due), exc))
            renewed = []
        by_host = {row.get("host"): row for row in renewed}
        for row in results:
            outcome = by_host.get(row.get("host"))
            if outcome is None:
                continue
            row["renewal"] = {k: outcome[k] for k in ("status", "expiry", "error") if k in outcome}
            if outcome.get("status") == "renewed":
                row.update(expiry=outcome["expiry"], days_left=lifecycle.days_left(outcome["expiry"]))
                sys.stderr.write("renewed %s: certificate now expires %s\n"
                                 % (row["host"], outcome["expiry"]))
            else:
                sys.stderr.write("warning: renewal of %s failed: %s\n"
                                 % (row["host"], outcome.get("error")))
    for row in results:
        left = row.get("days_left")
        if row.get("status") == "ok" and left is not None and left < lifecycle.WARN_DAYS:
            sys.stderr.write("warning: %s certificate %s (%s); renew it: %s renew %s\n"
                             % (row["host"], "expired %d days ago" % -left if left < 0
                                else "expires in %d days" % left, row.get("expiry"), PROG,
                                row["host"]))


def _cmd_renew(ctx: _Context) -> int:
    """renew HOST... | --all: renew agent certificates over their mTLS link."""
    args = ctx.args
    if args.all:
        names = ctx.store.registry.names()
    elif args.tags:
        names = [rec["name"] for rec in ctx.store.registry.list(_tag_selector(args.tags))]
    else:
        names = list(dict.fromkeys(args.hosts))
    if not names:
        raise _usage("renew needs HOST names, --tags k=v,... or --all (and at least one "
                     "registered agent)")
    try:
        rows = lifecycle.renew(ctx.cfg, ctx.store.registry, ctx.engine(), names)
    except lifecycle.LifecycleError as exc:
        raise CliError(str(exc), code=EXIT_USAGE, error="pki error") from None
    _audit_rows(ctx, "renew", rows)
    ok = all(row.get("status") == "renewed" for row in rows)
    if ctx.json:
        _print_json({"ok": ok, "results": rows})
        return EXIT_OK if ok else EXIT_FAILED
    _print_table(("HOST", "STATUS", "CERT EXPIRY", "DAYS LEFT", "SERIAL"),
                 [(row.get("host"), row.get("status"), row.get("expiry", ""),
                   "" if row.get("days_left") is None else row.get("days_left"),
                   row.get("serial", "")) for row in rows])
    for row in rows:
        if row.get("status") != "renewed":
            _out("ERROR %s: %s" % (row.get("host"), _safe(row.get("error") or "no answer")))
    return EXIT_OK if ok else EXIT_FAILED


def _audit_rows(ctx: _Context, action: str, rows: list) -> None:
    """One audit line per host of a lifecycle operation (renew)."""
    for row in rows:
        audit.record(ctx.cfg, action=action, via="cli", user=ctx.credentials()[0],
                     source_ip=CLI_SOURCE_IP, hosts=[row.get("host")], reqid=row.get("reqid"),
                     outcome=row.get("status"), detail=row.get("error") or row.get("expiry"))


def _cmd_rotate_dispatcher(ctx: _Context) -> int:
    """rotate-dispatcher [--finish]: rotate the dispatcher certificate with overlap."""
    ctx.engine()                # the current identity must load before anything changes

    def make_engine(cert: str, key: str) -> Any:
        try:
            return engine_mod.Engine(cert=cert, key=key, ca=ctx.cfg.ca,
                                     read_timeout=ctx.cfg.read_timeout,
                                     max_parallel=ctx.cfg.max_parallel,
                                     connect_timeout=ctx.cfg.connect_timeout)
        except engine_mod.EngineError as exc:
            raise lifecycle.LifecycleError(str(exc)) from None

    try:
        report = lifecycle.rotate_dispatcher(ctx.cfg, ctx.store.registry, make_engine,
                                             finish=ctx.args.finish)
    except (lifecycle.LifecycleError, OSError) as exc:
        audit.record(ctx.cfg, action="rotate-dispatcher", via="cli", user=ctx.credentials()[0],
                     source_ip=CLI_SOURCE_IP, outcome="error", detail=str(exc))
        raise CliError("dispatcher rotation failed: %s" % exc, code=EXIT_USAGE,
                       error="pki error") from None
    done = report["phase"] == "done"
    audit.record(ctx.cfg, action="rotate-dispatcher", via="cli", user=ctx.credentials()[0],
                 source_ip=CLI_SOURCE_IP, hosts=report["updated"], outcome=report["phase"],
                 detail="serial %s -> %s; pending: %s; stale: %s"
                        % (report["old_serial"], report["new_serial"],
                           ", ".join(r["host"] for r in report["pending"]) or "none",
                           ", ".join(report["stale"]) or "none"))
    if ctx.json:
        _print_json(dict(report, ok=done))
        return EXIT_OK if done else EXIT_FAILED
    _out("%s dispatcher certificate rotation: serial %s -> %s"
         % ("started" if report["started"] else "continued", report["old_serial"],
            report["new_serial"]))
    _out("updated: %d agent(s)%s" % (len(report["updated"]), (": " + ", ".join(report["updated"]))
                                      if report["updated"] else ""))
    for row in report["pending"]:
        _out("PENDING %s: %s" % (row["host"], _safe(row.get("error") or "not reached")))
    if report["stale"]:
        _out("stale (need re-pairing): %s" % ", ".join(report["stale"]))
    if done:
        _out("rotation complete: the previous certificate is retired and its key deleted")
    else:
        sys.stderr.write("warning: %d agent(s) still trust only the previous certificate; run "
                         "`%s rotate-dispatcher` again when they are back (or --finish to give "
                         "up on them: they would need re-pairing)\n" % (len(report["pending"]), PROG))
    return EXIT_OK if done else EXIT_FAILED


def _cmd_audit(ctx: _Context) -> int:
    """audit verify: walk the hash chain; exit 1 naming the first bad line."""
    path = ctx.args.file or audit.log_path(ctx.cfg)
    try:
        result = audit.verify(path)
    except audit.AuditError as exc:
        raise CliError("audit log does not verify: %s" % exc, error="audit broken") from None
    if ctx.json:
        _print_json(dict(result, ok=True))
    else:
        _out("audit log ok: %d line(s), numbers %s-%s, %d file(s), chain intact"
             % (result["lines"], result["first"], result["last"], len(result["files"])))
    return EXIT_OK


def _cmd_revoke(ctx: _Context) -> int:
    """revoke NAME: remove it from the registry; renewal and pairing refuse its serial and key."""
    name = ctx.args.name
    registry = ctx.store.registry
    record = registry.get(name)
    if record is None:
        raise CliError("no agent named %s (see `%s list-agents`)" % (name, PROG), error="not found")
    peer_serial = ""
    if not record.get("serial"):    # registered before serials were recorded: ask the agent
        rows = ctx.engine().identify_all(registry.resolve([name]))
        peer_serial = rows[0].get("serial", "") if rows and rows[0].get("status") == "ok" else ""
    try:
        entry = lifecycle.revoke(ctx.cfg, registry, name, peer_serial=peer_serial)
    except lifecycle.LifecycleError as exc:
        raise CliError(str(exc), error="not found") from None
    audit.record(ctx.cfg, action="revoke", via="cli", user=ctx.credentials()[0],
                 source_ip=CLI_SOURCE_IP, hosts=[name], outcome="revoked",
                 detail="serial %s" % (entry["serial"] or "unknown"))
    if ctx.json:
        _print_json(dict(entry, ok=True))
        return EXIT_OK
    _out("revoked %s (serial %s): removed from the registry; its certificate is never renewed "
         "and its key never signed again" % (name, entry["serial"] or "unknown"))
    if not entry["serial"] and not entry["spki_sha256"]:
        sys.stderr.write("warning: the serial of %s is unknown (agent unreachable and not recorded "
                         "at pairing); only its registry entry was removed\n" % name)
    return EXIT_OK


def _cmd_discovery(ctx: _Context) -> int:
    """discovery [HOST...]: scripts and tags per agent; caches tags in the registry."""
    body = ctx.request(**_host_fields(ctx.args)) if ctx.args.hosts or ctx.args.tags \
        else ctx.request()
    req = service_mod.validate_discovery(body, max_hosts=ctx.cfg.max_hosts)
    out = ctx.service().discovery(req, source_ip=CLI_SOURCE_IP)
    if not out:
        if ctx.json:
            _print_json({"ok": True, "hosts": {}})
        else:
            _out("no agents registered")
        return EXIT_OK
    ok = all(row.get("status") == "ok" for row in out.values())
    if ctx.json:
        _print_json({"ok": ok, "hosts": out})
        return EXIT_OK if ok else EXIT_FAILED
    for name, row in out.items():
        if row.get("status") != "ok":
            _out("==> %s  ERROR  %s" % (name, _safe(row.get("error") or "no answer")))
            continue
        _out("==> %s  ok  version:%s  %s" % (name, _safe(row.get("version") or "?"),
                                            row.get("rtt") or ""))
        tags = row["tags"]
        _out("  tags:    %s" % (_safe(", ".join("%s=%s" % kv for kv in sorted(tags.items())))
                                or "(none)"))
        scripts = [s.get("name") if isinstance(s, dict) else s
                   for s in (row.get("scripts") or [])]
        _out("  scripts: %s" % (_safe(", ".join(str(s) for s in scripts)) or "(none)"))
        if row.get("expiry"):
            _out("  cert:    expires %s (%s days left)" % (row["expiry"], row.get("days_left")))
    return EXIT_OK if ok else EXIT_FAILED


def _cmd_status(ctx: _Context) -> int:
    """status REQID: the stored run, refreshed from the agents when async and pending."""
    record = _refreshed_record(ctx, ctx.args.reqid)
    if ctx.json:
        _print_json(store_mod.status_view(record))
    else:
        _print_status(record)
    return EXIT_OK


def _cmd_wait(ctx: _Context) -> int:
    """wait REQID: poll every 2 s; 0 complete and all ok, 1 complete with a failure, 2 timeout."""
    reqid = ctx.args.reqid
    try:
        return _wait_for(ctx, reqid)
    except KeyboardInterrupt:
        _offer_cancel(ctx, reqid)
        raise


def _wait_for(ctx: _Context, reqid: str) -> int:
    """wait's loop (see _cmd_wait)."""
    deadline = time.monotonic() + ctx.args.timeout
    while True:
        record = _refreshed_record(ctx, reqid)
        if record.get("complete"):
            ok = all(_row_ok(row) for row in _record_rows(record))
            if ctx.json:
                _print_json(dict(store_mod.status_view(record), ok=ok))
            else:
                _print_status(record)
            return EXIT_OK if ok else EXIT_FAILED
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(WAIT_POLL_S, left))
    message = ("timed out after %ds waiting for reqid %s (still pending: %s)"
               % (ctx.args.timeout, reqid, ", ".join(map(str, record.get("pending") or []))))
    if ctx.json:
        _print_json(dict(store_mod.status_view(record), ok=False, error="timed out", detail=message))
    else:
        _print_status(record)
        sys.stderr.write(message + "\n")
    return EXIT_USAGE       # reference §6.1: wait exits 2 when it times out


def _cmd_cancel(ctx: _Context) -> int:
    """cancel REQID: hosts not started are skipped, the agents kill the run (0 when every
    host confirmed or was not running it any more, 1 otherwise)."""
    username, token = ctx.credentials()
    req = service_mod.validate_cancel({"grace": ctx.args.grace, "username": username,
                                       "token": token})
    try:
        out = ctx.service().cancel(ctx.args.reqid, source_ip=CLI_SOURCE_IP,
                                   username=req["username"], token=req["token"],
                                   grace=req["grace"])
    except service_mod.RunFinished as exc:
        raise CliError(exc.detail, error="finished") from None
    ok = all(row.get("status") in ("cancelled", "not_running") for row in out["results"])
    if ctx.json:
        _print_json(dict(out, ok=ok))
    else:
        _print_table(("HOST", "STATUS", "SIGNAL", "RTT"),
                     [(row.get("host"), row.get("status"), row.get("signal") or "-",
                       row.get("rtt")) for row in out["results"]])
        for row in out["results"]:
            if row.get("error"):
                _out("ERROR %s: %s" % (row.get("host"), _safe(row["error"])))
    return EXIT_OK if ok else EXIT_FAILED


def _cmd_runs(ctx: _Context) -> int:
    """runs: recent runs, newest first (filters as GET /runs)."""
    query = {name: getattr(ctx.args, name) for name in
             ("script", "host", "user", "state", "since", "limit", "offset")}
    username, token = ctx.credentials()
    out = ctx.service().list_runs(service_mod.validate_runs_query(query),
                                  source_ip=CLI_SOURCE_IP, username=username, token=token)
    if ctx.json:
        _print_json(out)
        return EXIT_OK
    if not out["runs"]:
        _out("no runs")
        return EXIT_OK
    rows = []
    for run in out["runs"]:
        counts = ", ".join("%s %d" % (state, n) for state, n in run["summary"].items() if n)
        when = (datetime.datetime.fromtimestamp(run["completed"], datetime.timezone.utc)
                .strftime("%Y-%m-%d %H:%M:%SZ") if run.get("completed") else "running")
        rows.append((run["reqid"], run["script"], run["mode"], len(run["hosts"]),
                     run["user"] or "-", when, counts or "-"))
    _print_table(("REQID", "SCRIPT", "MODE", "HOSTS", "USER", "COMPLETED", "STATES"), rows)
    if out["next_offset"] is not None:
        _out("more: runs --offset %d" % out["next_offset"])
    return EXIT_OK


def _offer_cancel(ctx: _Context, reqid: str) -> None:
    """Ctrl-C during run --follow / wait: cancel the run on the agents if asked to."""
    if not getattr(ctx.args, "cancel_on_interrupt", False):
        if not (_isatty(sys.stdin) and _isatty(sys.stderr)):
            sys.stderr.write("\ninterrupted; the run goes on (cancel it with: %s cancel %s)\n"
                             % (PROG, reqid))
            return
        sys.stderr.write("\ncancel run %s on the agents? [y/N] " % reqid)
        sys.stderr.flush()
        try:
            answer = sys.stdin.readline().strip().lower()
        except KeyboardInterrupt:
            answer = ""
        if answer not in ("y", "yes"):
            sys.stderr.write("the run goes on (cancel it with: %s cancel %s)\n" % (PROG, reqid))
            return
    username, token = ctx.credentials()
    try:
        out = ctx.service().cancel(reqid, source_ip=CLI_SOURCE_IP, username=username,
                                   token=token)
    except (service_mod.ServiceError, store_mod.StoreError) as exc:
        sys.stderr.write("cancel of %s failed: %s\n" % (reqid, exc))
        return
    states = ", ".join("%s %s" % (row.get("host"), row.get("status")) for row in out["results"])
    sys.stderr.write("cancelled %s: %s\n" % (reqid, states or "no host"))


def _cmd_list_locks(ctx: _Context) -> int:
    """list-locks: host+script locks currently held by any process."""
    held = ctx.store.locks.held()
    if ctx.json:
        _print_json(held)
    elif not held:
        _out("no locks held")
    else:
        _print_table(("HOST", "SCRIPT"), [(h.get("host"), h.get("script")) for h in held])
    return EXIT_OK


def _cmd_purge(ctx: _Context) -> int:
    """purge: delete run records older than run_retention."""
    count = ctx.store.runs.purge()
    wire.log_action("info", "purge", count=count)
    if ctx.json:
        _print_json({"ok": True, "purged": count})
    else:
        _out("purged %d run record%s" % (count, "" if count == 1 else "s"))
    return EXIT_OK


#: command -> (handler, parser builder)
_COMMANDS = {
    "setup-ca": (_cmd_setup_ca, _build_none),
    "setup-dispatcher": (_cmd_setup_dispatcher, _build_setup_dispatcher),
    "pairing-mode": (_cmd_pairing_mode, _build_pairing_mode),
    "list-requests": (_cmd_list_requests, _build_none),
    "approve": (_cmd_approve, _build_approve),
    "deny": (_cmd_deny, _build_reqid),
    "enroll": (_cmd_enroll, _build_enroll),
    "list-agents": (_cmd_list_agents, _build_list_agents),
    "unpair": (_cmd_unpair, _build_name),
    "run": (_cmd_run, _build_run),
    "ping": (_cmd_ping, _build_ping),
    "discovery": (_cmd_discovery, _build_discovery),
    "status": (_cmd_status, _build_reqid),
    "wait": (_cmd_wait, _build_wait),
    "cancel": (_cmd_cancel, _build_cancel),
    "runs": (_cmd_runs, _build_runs),
    "renew": (_cmd_renew, _build_renew),
    "rotate-dispatcher": (_cmd_rotate_dispatcher, _build_rotate_dispatcher),
    "revoke": (_cmd_revoke, _build_name),
    "audit": (_cmd_audit, _build_audit),
    "list-locks": (_cmd_list_locks, _build_none),
    "purge": (_cmd_purge, _build_none),
}


# --- helpers: validation ---

def _usage(message: str) -> CliError:
    """A usage error (exit 2) in the API's 400 wording."""
    return CliError(message, code=EXIT_USAGE, error="bad request")


def _parse_tags(text: str) -> dict:
    """"role=web,env=prod" -> {"role": "web", "env": "prod"}; CliError(2) when malformed."""
    tags = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        match = _TAG_ITEM_RE.match(item)
        if not match:
            raise _usage("tag %r is not valid; accepted: key=value[,key=value...]" % item)
        if match.group(1) in tags:
            raise _usage("tag key %r is given twice; accepted: each key once" % match.group(1))
        tags[match.group(1)] = match.group(2).strip()
    return tags


def _tag_selector(text: str) -> dict:
    """--tags "role=web|db,env=prod" -> {"role": ["web", "db"], "env": "prod"}."""
    selector = {}
    for key, value in _parse_tags(text).items():
        values = [v.strip() for v in value.split("|") if v.strip()]
        selector[key] = values if len(values) > 1 else value
    return selector


def _host_fields(args: argparse.Namespace) -> dict:
    """hosts and targets of ping / discovery in the API's body shape."""
    fields = {}
    if args.hosts or not args.tags:
        fields["hosts"] = list(args.hosts)
    if args.tags:
        fields["targets"] = {"tags": _tag_selector(args.tags)}
    return fields


def _pki_call(func: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a pki or pairing function; PKIError / PairingError becomes a one-line exit-2 error."""
    try:
        return func(*args, **kwargs)
    except (pki.PKIError, pairing.PairingError) as exc:
        raise CliError(str(exc), code=EXIT_USAGE, error="pki error") from None


def _require_pending(ctx: _Context, reqid: str) -> None:
    """An unknown pairing reqid is "not found" (exit 1), not a usage error."""
    ids = {row.get("id") for row in _pki_call(pairing.list_requests, ctx.cfg)}
    if reqid not in ids:
        raise CliError("no pending pairing request %s (see `%s list-requests`)" % (reqid, PROG),
                       error="not found")


# --- helpers: run records ---

def _refreshed_record(ctx: _Context, reqid: str) -> dict:
    """The stored record of reqid (action status); a pending async run is aggregated first."""
    username, token = ctx.credentials()
    return ctx.service().status(reqid, source_ip=CLI_SOURCE_IP, token=token, username=username)


def _outcome_error(exc: Exception) -> CliError:
    """The CLI's answer to a service outcome: one line and the exit code of SPEC §7."""
    if isinstance(exc, service_mod.BadRequest):
        return _usage(exc.detail)
    if isinstance(exc, service_mod.Denied):
        return CliError("Denied: %s" % exc, code=EXIT_DENIED, body=exc.body)
    if isinstance(exc, store_mod.LockConflict):
        return CliError("Locked: already running: %s"
                        % ", ".join("%s:%s" % (name, exc.script) for name in exc.conflicts),
                        code=EXIT_LOCKED, body={"ok": False, "error": "locked",
                                                "code": EXIT_LOCKED, "conflicts": list(exc.conflicts)})
    if isinstance(exc, service_mod.NotFound):
        return CliError(exc.detail, error="not found")
    if isinstance(exc, store_mod.CorruptRecord):
        return CliError(str(exc), error="corrupt record")
    if isinstance(exc, store_mod.StoreUnavailable):
        return CliError(str(exc), error="service unavailable")
    if isinstance(exc, service_mod.RunNotTracked):
        return CliError(str(exc), error="not tracked")
    return CliError(str(exc), code=EXIT_USAGE, error="config error")


def _record_rows(record: dict) -> list:
    """Per-host rows of a record, in request order (also the reference's {host: {...}} map)."""
    results = record.get("results")
    if isinstance(results, list):
        return [row for row in results if isinstance(row, dict)]
    hosts = record.get("hosts")
    if isinstance(hosts, dict):
        return [dict(v, host=k) for k, v in hosts.items() if isinstance(v, dict)]
    return []


def _row_ok(row: dict) -> bool:
    """A host succeeded: it ran and exited 0 (async rows must also be "done")."""
    return row.get("status") in (None, "done", "ok") and row.get("exit") == 0


# --- helpers: output ---

def _out(text: str = "") -> None:
    """One line on stdout."""
    sys.stdout.write(text + "\n")


def _json_text(obj: Any, *, pretty: bool = True) -> str:
    """JSON text (ujson; true/false booleans, no escaped slashes)."""
    if pretty:
        return ujson.dumps(obj, indent=2, escape_forward_slashes=False, ensure_ascii=False)
    return ujson.dumps(obj, escape_forward_slashes=False, ensure_ascii=False)


def _print_json(obj: Any) -> None:
    """The --json answer of a command on stdout."""
    _out(_json_text(obj))


def _report_error(args: argparse.Namespace, exc: CliError) -> int:
    """Print a failure (JSON on stdout with --json, else one line on stderr); return its code."""
    if getattr(args, "json", False):
        _print_json(exc.body)
    else:
        message = exc.message
        if exc.code not in (EXIT_DENIED, EXIT_LOCKED) and not message.startswith("Aborted"):
            message = "error: " + message
        sys.stderr.write(message + "\n")
    return exc.code


def _isatty(stream: Any) -> bool:
    """stream.isatty(), False for streams without it."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _safe(text: Any) -> str:
    """Text from an agent, with terminal control characters neutralised on a TTY."""
    text = "" if text is None else str(text)
    if _isatty(sys.stdout):
        return _TERMINAL_UNSAFE_RE.sub("?", text)
    return text


def _print_table(headers: tuple, rows: list) -> None:
    """An aligned table: columns padded to their widest cell, two spaces apart."""
    cells = [[_safe("" if c is None else c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for row in [list(headers)] + cells:
        _out("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _print_block(label: str, text: Any) -> None:
    """Script output as-is, ending with a newline."""
    text = _safe(text)
    if not text:
        return
    if label:
        _out(label)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _print_run_row(row: dict, reqid: str, *, with_output: bool = True) -> None:
    """`==> web-01  OK  exit:0  12ms  req:<reqid>`, then stdout, STDERR:, ERROR:."""
    host = _safe(row.get("host"))
    status = row.get("status")
    if (status in (None, "done") or status in engine_mod.HOST_STATES) and "exit" in row:
        parts = ["==> %s" % host, "OK" if _row_ok(row) else "FAIL", "exit:%s" % row.get("exit")]
        if row.get("rtt"):
            parts.append(str(row["rtt"]))
        parts.append("req:%s" % (row.get("reqid") or reqid))
        if row.get("timed_out"):
            parts.append("TIMED OUT")
        elif status not in (None, "done", "ok", "failed"):
            parts.append(status.upper().replace("_", " "))
        if row.get("truncated"):
            parts.append("TRUNCATED")
        _out("  ".join(parts))
    else:
        label = str(status or "error").upper()
        _out("==> %s  %s  req:%s" % (host, label, row.get("reqid") or reqid))
    if with_output:
        _print_block("", row.get("stdout"))
        _print_block("STDERR:", row.get("stderr"))
    for key, label in (("error", "ERROR"), ("fetch_error", "FETCH ERROR")):
        if row.get(key):
            _out("%s: %s" % (label, _safe(row[key])))


def _print_async_submit(ctx: _Context, reqid: str, results: list) -> int:
    """`Submitted async run req:<reqid>` + per-host accepted / BUSY / ERROR; 0 if any accepted."""
    accepted = any(row.get("status") == "accepted" for row in results)
    if ctx.json:
        _print_json({"ok": accepted, "async": True, "reqid": reqid, "results": results})
        return EXIT_OK if accepted else EXIT_FAILED
    _out("Submitted async run req:%s" % reqid)
    for row in results:
        status = row.get("status")
        label = "accepted" if status == "accepted" else str(status or "error").upper()
        line = "  %s  %s" % (_safe(row.get("host")), label)
        if row.get("error"):
            line += "  %s" % _safe(row["error"])
        _out(line)
    if accepted:
        _out("check with: %s status %s   (or: %s wait %s)" % (PROG, reqid, PROG, reqid))
    return EXIT_OK if accepted else EXIT_FAILED


def _print_status(record: dict) -> None:
    """`Request <id> (script: <s>) [COMPLETE|PENDING]` + per-host blocks."""
    _out("Request %s (script: %s) [%s]" % (record.get("reqid"), _safe(record.get("script")),
                                           "COMPLETE" if record.get("complete") else "PENDING"))
    for row in _record_rows(record):
        _print_run_row(row, str(record.get("reqid")))


def _days_left(expiry: Any) -> str:
    """Whole days until an openssl-style expiry ("Jun  7 16:28:00 2027 GMT"), or "?"."""
    try:
        when = datetime.datetime.strptime(str(expiry), "%b %d %H:%M:%S %Y GMT")
    except ValueError:
        return "?"
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    return str((when - now).days)


class _Progress:
    """`12/40 hosts done` on stderr (TTY only), rewritten in place, counted from exit events."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self._draw()

    def event(self, event: dict) -> None:
        """Engine on_event callback."""
        if isinstance(event, dict) and event.get("event") == "exit":
            self.done += 1
            self._draw()

    def clear(self) -> None:
        """Erase the progress line."""
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()

    def _draw(self) -> None:
        """Rewrite the line."""
        sys.stderr.write("\r%d/%d hosts done" % (self.done, self.total))
        sys.stderr.flush()


class _Follower:
    """--follow: output lines as they arrive, `web-01 | ` (stdout) / `web-01 ! ` (stderr).

    Agents send chunks, not lines, so partial lines are buffered per host+stream and
    flushed at that host's exit event (or at the end).
    """

    def __init__(self, *, json_lines: bool) -> None:
        self.json_lines = json_lines
        self._partial: dict = {}

    def event(self, event: dict) -> None:
        """Engine on_event callback."""
        if not isinstance(event, dict):
            return
        if self.json_lines:
            sys.stdout.write(_json_text(event, pretty=False) + "\n")
            sys.stdout.flush()
            return
        kind = event.get("event")
        host = str(event.get("host", ""))
        if kind in ("stdout", "stderr"):
            key = (host, kind)
            text = self._partial.pop(key, "") + str(event.get("data", ""))
            lines = text.split("\n")
            if lines[-1]:
                self._partial[key] = lines[-1]
            for line in lines[:-1]:
                self._write(host, kind, line)
        elif kind == "exit":
            self._flush_host(host)
        sys.stdout.flush()

    def flush(self) -> None:
        """Write every buffered partial line."""
        for host, kind in list(self._partial):
            self._write(host, kind, self._partial.pop((host, kind)))
        sys.stdout.flush()

    def _flush_host(self, host: str) -> None:
        """Write the buffered partial lines of one host."""
        for kind in ("stdout", "stderr"):
            if (host, kind) in self._partial:
                self._write(host, kind, self._partial.pop((host, kind)))

    def _write(self, host: str, kind: str, line: str) -> None:
        """One prefixed line."""
        sys.stdout.write("%s %s %s\n" % (_safe(host), "|" if kind == "stdout" else "!",
                                         _safe(line)))


if __name__ == "__main__":
    sys.exit(main())
