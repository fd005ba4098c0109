"""``GET /``: the status page, one server-rendered HTML document (no script, no external
asset, no build step) that shows the project at a glance; and ``GET
/v1/checkpoint/files/{name}``, which serves the files of the resolved checkpoint it links to.

Every value on the page comes from ops that other members wrote (project name, labels,
parameters) or from this server's state, and is HTML-escaped where it is written; the
answer also carries a Content-Security-Policy that allows no script at all, so an escape
that was missed still could not run one.

Tokens: the read scope, as for the JSON routes (``Authorization: Bearer TOKEN``). So that a
person can open the page in a browser, the token may also be given as the password of
HTTP Basic authentication (any user name): a ``401`` asks for it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import html
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse
from starlette.exceptions import HTTPException

from crdt_merge import ENGINE, maintenance
from crdt_merge.crdt.ops import Op
from crdt_merge.errors import CrdtMergeError
from crdt_merge.sync import wire
from crdt_merge_server.auth import SITE_KEY
from crdt_merge_server.errors import error_response
from crdt_merge_server.metrics import peer_label
from crdt_merge_server.settings import Token

router = APIRouter()
#: the names a checkpoint's files have (model-00001-of-00002.safetensors, README.md, ...)
FileName = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$",
                                    description="a file name of the resolved checkpoint")]

CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
#: seconds between the page's own reloads (a meta refresh: no script)
REFRESH_SECONDS = 5
CHALLENGE = 'Bearer, Basic realm="crdt-merge", charset="UTF-8"'


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# -- who may read ---------------------------------------------------------------------------


def page_token(request: Request, scope: str = "read") -> Token | None:
    """``scope``, with a Bearer token or the token as a Basic password.

    Raises:
        Unauthenticated, Forbidden: as for the JSON routes.
    """
    gate = request.app.state.gate
    kind, _, credentials = request.headers.get("authorization", "").partition(" ")
    if gate.open or kind.lower() != "basic":
        token = gate.check(request, scope)
    else:
        token = _basic(gate, credentials, scope)
    if token is not None:  # for the access log: the site, never the token
        request.scope[SITE_KEY] = token.site
    return token


def read_scope(request: Request) -> None:
    """A FastAPI dependency: :func:`page_token` for the read scope."""
    page_token(request)


def _basic(gate: Any, credentials: str, scope: str) -> Token:
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise wire.Unauthenticated("malformed Basic credentials") from None
    token = gate.token_for(decoded.partition(":")[2])
    if token is None:
        raise wire.Unauthenticated("the token (the Basic password) is not one this server "
                                   "accepts")
    if scope not in token.scopes:
        raise wire.Forbidden(f"the token of site {token.site!r} lacks the {scope!r} scope")
    return token


# -- what the page shows --------------------------------------------------------------------


@functools.cache
def machine_profile() -> dict[str, str]:
    """The numeric profile of this installation (engine, numeric rules, torch, CPU)."""
    try:
        from crdt_merge.resolve.profile import numeric_profile
    except ImportError:
        return {"engine": ENGINE}
    return numeric_profile()


def members(replica: Any, status: dict[str, Any], ops: Iterable[Op]) -> list[dict[str, Any]]:
    """Members with role and state: the replica's own list when its status has one
    (``members``), else from the genesis and admit ops (every member is live then)."""
    given = status.get("members")
    if isinstance(given, list):
        return [{"site": m.get("site", ""), "role": m.get("role", ""),
                 "state": m.get("state", "live"), "key": m.get("key", "")}
                for m in given if isinstance(m, dict)]
    found: dict[str, dict[str, Any]] = {}
    for op in sorted(ops, key=lambda o: (o.clock, o.id)):
        if op.kind == "genesis":
            for site, entry in sorted(op.body["sites"].items()):
                found[site] = {"site": site, "role": entry["role"], "state": "live",
                               "key": bytes(entry["key"]).hex()}
        elif op.kind == "admit":
            a = op.body["admit"]
            prior = found.get(a["site"])
            role = "admin" if a["role"] == "admin" or (prior and prior["role"] == "admin") \
                else a["role"]
            found[a["site"]] = {"site": a["site"], "role": role, "state": "live",
                                "key": bytes(a["key"]).hex()}
    return [found[s] for s in sorted(found)]


class PlanView:
    """The plan's fate of each contribution (:mod:`crdt_merge.resolve.fates`), computed
    once per state root."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: tuple[str, dict[str, str], str | None] | None = None

    def fates(self, replica: Any, root: str) -> tuple[dict[str, str], str | None]:
        """``({op id: fate}, why there is no plan or None)``."""
        with self._lock:
            if self._cache is not None and self._cache[0] == root:
                return self._cache[1], self._cache[2]
            try:
                from crdt_merge.resolve.fates import planned_fates
            except ImportError as exc:
                out: tuple[dict[str, str], str | None] = ({}, f"resolve is not available ({exc})")
            else:
                _, error, fate = planned_fates(replica)
                out = ({i: str(f) for i, f in fate.items()},
                       None if error is None else error.detail)
            self._cache = (root, *out)
            return out


def manifest_size(replica: Any, manifest_id: str) -> int | None:
    try:
        m = replica.get_manifest(manifest_id)
    except CrdtMergeError:
        return None
    return sum(t.nbytes for t in m.tensors.values()) + sum(f.size for f in m.files.values())


def human_bytes(n: int | None) -> str:
    if n is None:
        return "not held"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def table(head: list[str], rows: list[list[str]], empty: str, cls: str = "") -> str:
    """A table whose cells are already HTML (escaped by the caller)."""
    if not rows:
        return f'<p class="empty">{esc(empty)}</p>'
    out = [f'<table class="{cls}"><thead><tr>']
    out += [f"<th>{esc(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def code(value: Any, id_: str | None = None) -> str:
    ident = f' id="{esc(id_)}"' if id_ else ""
    return f"<code{ident}>{esc(value)}</code>"


def params_text(params: Any) -> str:
    if not isinstance(params, dict) or not params:
        return ""
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items(), key=lambda kv: str(kv[0])))


def render(request: Request) -> str:
    """The page's HTML (call it off the event loop: it reads the replica)."""
    service = request.app.state.service
    replica = service.replica
    status = maintenance.status(replica)
    ops = list(replica.ops().values())
    root = status["state_root"]
    genesis = replica.get_op(replica.genesis_id)
    name = genesis.body.get("name", "") if genesis is not None else ""
    state = service.state()
    fates, no_plan = request.app.state.plan_view.fates(replica, root)
    sections: list[str] = []

    overview = [
        ("Project", esc(name)), ("Genesis id", code(replica.genesis_id, "genesis-id")),
        ("State root", code(root, "state-root")), ("This site", code(replica.site, "site")),
        ("Ops", f'<span id="op-count">{len(ops)}</span>'
                f' ({esc(status.get("staged", 0))} staged)'),
    ]
    sections.append("<section><h2>Overview</h2><dl>" + "".join(
        f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in overview) + "</dl></section>")

    rows = [[esc(m["site"]), esc(m["role"]),
             f'<span class="state-{esc(m["state"])}">{esc(m["state"])}</span>',
             code(str(m["key"])[:16] + ("…" if len(str(m["key"])) > 16 else ""))]
            for m in members(replica, status, ops)]
    sections.append("<section><h2>Members</h2>"
                    + table(["site", "role", "state", "key"], rows, "no members", "members")
                    + "</section>")

    rows = []
    for c in status["contributions"]:
        fate = fates.get(c["op_id"], "retracted" if not c["live"] else "live (no plan yet)")
        rows.append([esc(c["site"]), f'<span class="label">{esc(c["label"])}</span>',
                     esc(c["form"]), esc(human_bytes(manifest_size(replica, c["manifest"]))),
                     esc(params_text(c["params"])), esc(fate), code(c["op_id"][:16] + "…")])
    sections.append('<section class="wide"><h2>Contributions</h2>'
                    + table(["site", "label", "form", "size", "params", "plan", "op"], rows,
                            "no contributions yet", "contributions") + "</section>")

    recipe = status.get("recipe")
    parts = ["<section><h2>Recipe</h2>"]
    if recipe:
        parts.append(f'<p>Winner: <strong id="recipe-method">{esc(recipe["method"])}</strong>'
                     f' by {esc(recipe["site"])} {esc(params_text(recipe["params"]))}'
                     f' {code(recipe["op_id"][:16] + "…")}</p>')
    else:
        parts.append('<p class="empty">no recipe yet</p>')
    conflicts = status.get("conflicts") or []
    parts.append(table(["conflicting recipe", "by", "op"],
                       [[esc(c["method"]), esc(c["site"]), code(c["op_id"][:16] + "…")]
                        for c in conflicts], "no conflicting recipes"))
    if no_plan is not None:
        parts.append(f'<p class="note">No plan: {esc(no_plan)}</p>')
    parts.append("</section>")
    sections.append("".join(parts))

    parts = ["<section><h2>Checkpoint</h2>"]
    if state.get("checkpoint_id"):
        parts.append(f'<p>Checkpoint id {code(state["checkpoint_id"], "checkpoint-id")}'
                     f'<br>Plan id {code(state["plan_id"], "plan-id")}</p>')
        folder = Path(service.checkpoint_dir) / state["plan_id"]
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        parts.append(table(["file", "size"], [
            [f'<a href="/v1/checkpoint/files/{esc(quote(f.name))}">{esc(f.name)}</a>',
             esc(human_bytes(f.stat().st_size))] for f in files], "no files", "files"))
    else:
        parts.append('<p class="empty" id="checkpoint-id">not resolved for this state yet'
                     ' — <a href="/?resolve=1">resolve it now</a></p>')
    sections.append("".join(parts) + "</section>")

    rows = []
    last = service.anti_entropy.last
    for url in service.settings.peers:
        result = last.get(url)
        if result is None:
            outcome = "no round yet"
        elif result.get("ok"):
            outcome = (f"ok: {result.get('ops_received', 0)} ops, "
                       f"{result.get('objects_received', 0)} objects in "
                       f"{result.get('seconds', 0):.2f} s")
        else:
            outcome = f"failed: {result.get('code', '')}"
        rows.append([code(peer_label(url)), esc(outcome),
                     esc(when(result.get("at") if result else None))])
    sections.append("<section><h2>Peers</h2>"
                    + table(["peer", "last anti-entropy round", "at"], rows,
                            "no peers configured", "peers") + "</section>")

    profile = {**{f"project {k}": v for k, v in state.get("profile", {}).items()},
               **machine_profile(), "protocol": state.get("protocol", "")}
    sections.append("<section><h2>Numeric profile</h2><dl>" + "".join(
        f"<dt>{esc(k)}</dt><dd>{code(v)}</dd>" for k, v in profile.items()) + "</dl></section>")

    title = f"{name} · {replica.site}" if name else replica.site
    generated = when(time.time())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>{esc(title)} — crdt-merge</title>
<style>{STYLE}</style></head>
<body><header><h1>{esc(name) or "crdt-merge"} <small>at {esc(replica.site)}</small></h1>
<p class="meta">{esc(ENGINE)} · page made {esc(generated)} · reloads every {REFRESH_SECONDS} s ·
<a href="/metrics">metrics</a> · <a href="/openapi.json">API</a></p>
</header><main>{"".join(sections)}</main></body></html>
"""


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:12px 24px}header h1{margin:0;font-size:20px}
header small{font-weight:normal;opacity:.75}header a{color:#9cc3ff}.meta{margin:4px 0 0;opacity:.8}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:16px;padding:16px 24px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px 16px}
h2{font-size:15px;margin:6px 0 8px;text-transform:uppercase;letter-spacing:.04em;color:#4a5568}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:3px 8px 3px 0;
border-bottom:1px solid #eef0f3;vertical-align:top}th{font-weight:600;color:#4a5568}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0}dt{color:#4a5568}
dd{margin:0}code{font:12px ui-monospace,monospace;word-break:break-all}
.empty,.note{color:#6b7280}.state-live{color:#15803d}.state-revoked{color:#b91c1c}
.state-replaced{color:#a16207}section.wide{grid-column:1/-1}td code{white-space:nowrap}
"""


@router.get("/", tags=["meta"], response_class=HTMLResponse,
            summary="The status page (HTML); read scope, Bearer or the token as Basic password")
async def status_page(request: Request, resolve: str = "") -> Response:
    """``?resolve=1`` resolves the current state first (as ``GET /v1/checkpoint``)."""
    try:
        page_token(request)
    except wire.Unauthenticated as exc:  # the JSON error, with a challenge a browser answers
        answer = error_response(exc)
        answer.headers["WWW-Authenticate"] = CHALLENGE
        return answer
    service = request.app.state.service
    if resolve in ("1", "true", "yes"):  # as GET /v1/checkpoint: once per plan, then cached
        await run_in_threadpool(service.checkpoint)
    page = await run_in_threadpool(render, request)
    return HTMLResponse(page, headers=SECURITY_HEADERS)


@router.get("/v1/checkpoint/files/{name}", tags=["state"],
            dependencies=[Depends(read_scope)],
            summary="A file of the checkpoint resolved for the current state")
def checkpoint_file(request: Request, name: FileName) -> Response:
    """Only the names listed in the resolved checkpoint's folder are served (the name is
    compared with that listing, never joined to a path first); ``404`` when the current
    state has not been resolved (``GET /v1/checkpoint``) or the name is not there. Read
    scope, Bearer or Basic (the page links here)."""
    service = request.app.state.service
    plan_id = service.state().get("plan_id")
    if not plan_id:
        raise HTTPException(404, "the current state has not been resolved: GET /v1/checkpoint")
    folder = Path(service.checkpoint_dir) / plan_id
    listing = {p.name: p for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
    if name not in listing:
        raise HTTPException(404, "no such file in the resolved checkpoint")
    return FileResponse(listing[name], media_type=wire.OCTETS, filename=name)
