"""The REST API (FastAPI; entrypoint layer): the user terminal asks for
permits and reads its rentals, sessions, balance and points; operators read
devices, batteries, slots, alarms and readings and revoke permits and users.
OpenAPI docs at /docs, the schema at /openapi.json.

    app = create_app(db.sessions(db.engine(url)), master)
    uvicorn.run(app, host="127.0.0.1", port=8080)

Each request is one transaction (services, through db.transaction): a
refused or invalid request changes nothing. Errors are JSON
{"detail": "<what is wrong>", "code": "<stable code>"}: 404 for an unknown
user, device, permit or battery; 422 for malformed input (with the field
named in detail); 402 / 403 / 409 for a permit request refused by an
approval condition (domain.check_request, code as there); 413 for a request
body over max_body bytes, answered from its Content-Length, or, for a body
without one, as soon as more than max_body bytes have arrived.

There is no authentication yet: anyone who reaches the port can use every
endpoint. Run it on loopback or behind a proxy that authenticates.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import keys, wire
from ..errors import VoltgateError
from . import domain, services
from .db import transaction

MAX_BODY = 16 * 1024
PREFIX = "/api/v1"

#: HTTP status of each refusal code of domain.check_request
REFUSAL_STATUS = {
    "unknown_user": 404,
    "unknown_device": 404,
    "user_inactive": 403,
    "device_disabled": 403,
    "wrong_action": 422,
    "out_of_scope": 422,
    "bad_window": 422,
    "starts_too_early": 422,
    "starts_too_late": 422,
    "window_too_long": 422,
    "in_debt": 402,
    "overdue_rental": 403,
    "overlap": 409,
    "too_many_permits": 403,
    "too_many_rentals": 403,
    "insufficient_funds": 402,
}

_HEX = r"^([0-9a-fA-F]{2})+$"
_USER = Field(min_length=1, max_length=wire.MAX_TEXT_CLAIM)


# ---------------------------------------------------------------- bodies


class PermitRequest(BaseModel):
    """A usage request (seed 004): who, which device, what, and when."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=wire.MAX_TEXT_CLAIM, description="the user asking")
    device_id: str = Field(pattern=keys.DEVICE_ID_RE.pattern, description="station or outlet board")
    action: Literal["rent", "return", "power", "service"]
    start: int | None = Field(None, ge=0, description="window start (nbf), Unix seconds; default: now")
    end: int | None = Field(None, ge=0, description="window end (exp), Unix seconds; or give duration_s")
    duration_s: int | None = Field(None, gt=0, le=366 * 86400, description="window length from start")
    scope: list[int] | None = Field(None, min_length=1, max_length=wire.MAX_SCOPE, description="slot or outlet indexes; default: any")
    max_wh: int | None = Field(None, ge=0, le=2**31 - 1, description="energy cap (power); default: what the funds check assumed")
    max_w: int | None = Field(None, ge=0, le=2**31 - 1, description="power cap")
    single_use: bool = True
    battery: str | None = Field(
        None, pattern=_HEX, max_length=2 * wire.MAX_BATTERY_ID, description="a return permit may name the battery (hex id)"
    )
    compact: bool = Field(False, description="HMAC 256/64 (a smaller QR code)")

    @model_validator(mode="after")
    def _window(self):
        if (self.end is None) == (self.duration_s is None):
            raise ValueError("give either end or duration_s")
        if self.end is not None and self.start is not None and self.end <= self.start:
            raise ValueError("end must be after start")
        if self.scope is not None and any(i < 0 or i >= wire.MAX_SCOPE for i in self.scope):
            raise ValueError(f"scope indexes are 0..{wire.MAX_SCOPE - 1}")
        if self.scope is not None and len(set(self.scope)) != len(self.scope):
            raise ValueError("scope names an index twice")
        return self


class EnergyReport(BaseModel):
    """An energy flow a device reports with a user id (seed 001)."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=wire.MAX_TEXT_CLAIM)
    device_id: str = Field(pattern=keys.DEVICE_ID_RE.pattern)
    direction: Literal["taken", "given"]
    energy_mwh: int = Field(ge=0, le=2**53, description="mWh, never negative: direction says which way")
    start: int = Field(ge=0, le=2**32 - 1)
    end: int = Field(ge=0, le=2**32 - 1)
    ref: str = Field(min_length=1, max_length=64, description="the report's id; repeating it books nothing twice")

    @model_validator(mode="after")
    def _order(self):
        if self.end < self.start:
            raise ValueError("end must not be before start")
        if self.end - self.start > 366 * 86400:
            raise ValueError("a report covers at most 366 days")
        return self


class RevokeUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["suspended", "closed"] = "suspended"


# ---------------------------------------------------------------- answers


class Estimate(BaseModel):
    energy_mwh: int
    energy_cents: int
    fee_cents: int


class PermitIssued(BaseModel):
    cti: str = Field(description="permit id, hex")
    user_id: str
    device_id: str
    action: str
    nbf: int
    exp: int
    max_wh: int | None
    token_b64url: str = Field(description="the COSE_Mac0 permit, base64url without padding")
    token_hex: str
    qr_png_b64: str = Field(description="a QR code of the token bytes (byte mode), PNG, base64")
    qr_png_url: str = Field(description="the same PNG")
    estimate: Estimate


class Balance(BaseModel):
    id: str
    name: str
    status: str
    balance: int = Field(description="cents")
    points: int
    points_value: int = Field(description="cents the points pay towards fees")


class DeviceOut(BaseModel):
    id: str
    site: str
    kind: str
    board: str
    fw_version: str | None
    key_version: int
    enabled: bool
    online: bool
    last_seen: int | None


class SlotOut(BaseModel):
    device: str
    index: int
    state: str
    battery: str | None


class OutletOut(BaseModel):
    device: str
    index: int
    state: str
    energy_mwh: int


class DeviceDetail(DeviceOut):
    slots: list[SlotOut]
    outlets: list[OutletOut]


class BatteryOut(BaseModel):
    id: str
    cycles: int
    soh: int | None
    soc: int | None
    device: str | None
    slot: int | None
    renter: str | None
    energy_in_mwh: int
    temp_min_dc: int | None
    temp_max_dc: int | None
    last_seen: int | None


class RentalOut(BaseModel):
    id: int
    user: str | None
    battery: str
    permit: str | None
    out_device: str
    out_slot: int
    out_ts: int
    out_soc: int | None
    in_device: str | None
    in_slot: int | None
    in_ts: int | None
    in_soc: int | None
    open: bool
    flagged: bool


class SessionOut(BaseModel):
    id: int
    device: str
    outlet: int
    permit: str
    user: str | None
    start_ts: int
    end_ts: int | None
    duration_s: int | None
    energy_mwh: int | None
    reason: str | None


class PermitOut(BaseModel):
    cti: str
    user: str
    device: str
    action: str
    scope: list[int] | None
    nbf: int
    exp: int
    max_wh: int | None
    single_use: bool
    issued_at: int
    key_version: int
    revoked_at: int | None


class EntryOut(BaseModel):
    seq: int
    ts: int
    user: str
    kind: str
    energy_mwh: int
    amount: int
    points: int
    ref: str
    hash: str


class CommandOut(BaseModel):
    id: int
    device: str
    type: int
    body: Any
    created: int
    done_at: int | None
    result: int | None


class Revoked(BaseModel):
    status: str
    commands: list[CommandOut]


class RecordOut(BaseModel):
    device: str
    epoch: int
    seq: int
    ts: int
    type: int
    type_name: str
    index: int | None
    battery: str | None
    body: Any


class LedgerCheckOut(BaseModel):
    ok: bool
    entries: int
    head_seq: int
    head_hash: str
    problem: dict | None
    mismatches: list[dict]


# ---------------------------------------------------------------- body size


class BodyLimit:
    """ASGI middleware: 413 for a request body over limit bytes, from the
    Content-Length before reading anything, or once more than limit bytes
    of a body without one have arrived (at most limit bytes are held)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _plain_error(send, 400, "Content-Length is not a number", "bad_request")
            if int(length) > self.limit:
                return await _plain_error(send, 413, f"the request body is {int(length)} bytes; at most {self.limit}", "too_large")
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > self.limit:
                return await _plain_error(send, 413, f"the request body is over {self.limit} bytes", "too_large")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _plain_error(send, status: int, detail: str, code: str) -> None:
    data = json.dumps({"detail": detail, "code": code}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------- helpers


def qr_png(data: bytes) -> bytes:
    """A QR code (byte mode, error correction L, as SPEC.md sizes it) of data, as PNG."""
    import qrcode
    from qrcode.image.pil import PilImage

    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_L, box_size=4, border=4, image_factory=PilImage)
    qr.add_data(data)
    qr.make(fit=True)
    buf = io.BytesIO()
    qr.make_image().save(buf, format="PNG")
    return buf.getvalue()


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts) or "invalid request"


def _types(names: list[str] | None) -> list[int] | None:
    if not names:
        return None
    by_name = {v: k for k, v in domain.RECORD_NAMES.items()}
    out = []
    for n in names:
        for part in n.split(","):
            part = part.strip()
            if part.isdigit() and len(part) <= 3:
                out.append(int(part))  # record types are 1..95
            elif part in by_name:
                out.append(by_name[part])
            else:
                raise services.Invalid(f"unknown record type {part!r}", "a number or one of " + ", ".join(sorted(by_name)))
    return out


# ---------------------------------------------------------------- the app


def create_app(session_factory, master: bytes, *, now: Callable[[], float] = time.time, max_body: int = MAX_BODY) -> FastAPI:
    """The API over a session factory (db.sessions) and the master secret
    (permits are MACed under keys derived from it). now: the clock (tests
    pass a fixed one)."""
    app = FastAPI(
        title="voltgate management server",
        version="1",
        description="Permits for stations and outlets, rentals, sessions, balances and points (user terminal); "
        "devices, batteries, alarms, readings and revocations (operators). Units: Unix seconds, mWh, cents, points. "
        "No authentication yet: serve it on loopback or behind an authenticating proxy.",
    )
    app.add_middleware(BodyLimit, limit=max_body)

    def clock() -> int:
        return int(now())

    def tx(fn):
        return services.retrying(session_factory, fn)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_message(exc), "code": "invalid"}, status_code=422)

    @app.exception_handler(VoltgateError)
    async def _voltgate(request: Request, exc: VoltgateError):
        detail = exc.problem + (f" ({exc.hint})" if exc.hint else "")
        if isinstance(exc, services.Refused):
            return JSONResponse({"detail": exc.message, "code": exc.code}, status_code=REFUSAL_STATUS.get(exc.code, 403))
        if isinstance(exc, services.NotFound):
            return JSONResponse({"detail": detail, "code": "not_found"}, status_code=404)
        if isinstance(exc, services.Invalid):
            return JSONResponse({"detail": detail, "code": "invalid"}, status_code=422)
        if isinstance(exc, services.Conflict):
            return JSONResponse({"detail": detail, "code": "conflict"}, status_code=409)
        return JSONResponse({"detail": detail, "code": "error"}, status_code=400)

    @app.get("/health", tags=["server"], summary="the server answers")
    def health() -> dict:
        return {"ok": True, "time": clock()}

    # -------------------------------------------------------- user terminal

    @app.post(f"{PREFIX}/permits", status_code=201, response_model=PermitIssued, tags=["user terminal"], summary="ask for a permit")
    def request_permit(body: PermitRequest, request: Request):
        """Issue a permit when the request meets the approval conditions;
        else 402/403/404/409/422 with the condition's code and why. The
        token goes to the board through the user's phone (QR, BLE, NFC)."""
        t = clock()

        def work(s):
            issued = services.request_permit(
                s,
                master,
                user_id=body.user_id,
                device_id=body.device_id,
                action=body.action,
                now=t,
                nbf=body.start,
                exp=body.end,
                duration_s=body.duration_s,
                scope=body.scope,
                max_wh=body.max_wh,
                max_w=body.max_w,
                single_use=body.single_use,
                battery=body.battery,
                compact=body.compact,
            )
            return services.permit_dict(issued.permit), issued.token, issued.estimate

        p, token, est = tx(work)
        return PermitIssued(
            cti=p["cti"],
            user_id=p["user"],
            device_id=p["device"],
            action=p["action"],
            nbf=p["nbf"],
            exp=p["exp"],
            max_wh=p["max_wh"],
            token_b64url=base64.urlsafe_b64encode(token).rstrip(b"=").decode(),
            token_hex=token.hex(),
            qr_png_b64=base64.b64encode(qr_png(token)).decode(),
            qr_png_url=str(request.url_for("permit_qr", cti=p["cti"]).path),
            estimate=Estimate(energy_mwh=est.energy_mwh, energy_cents=est.energy_cents, fee_cents=est.fee_cents),
        )

    @app.get(f"{PREFIX}/permits/{{cti}}/qr.png", name="permit_qr", tags=["user terminal"], summary="a permit as a QR code",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})  # fmt: skip
    def permit_qr(cti: str):
        with transaction(session_factory) as s:
            token = services.permit(s, cti).token
        return Response(qr_png(token), media_type="image/png")

    @app.get(f"{PREFIX}/permits/{{cti}}", response_model=PermitOut, tags=["user terminal"], summary="one permit")
    def get_permit(cti: str):
        with transaction(session_factory) as s:
            return services.permit_dict(services.permit(s, cti))

    @app.get(f"{PREFIX}/users/{{user_id}}", response_model=Balance, tags=["user terminal"], summary="balance and points")
    def balance(user_id: str):
        with transaction(session_factory) as s:
            return services.user_dict(services.user(s, user_id), services.load_policy(s))

    @app.get(f"{PREFIX}/users/{{user_id}}/rentals", response_model=list[RentalOut], tags=["user terminal"], summary="my rentals")
    def my_rentals(user_id: str, open: bool = False):
        with transaction(session_factory) as s:
            services.user(s, user_id)
            return [services.rental_dict(r) for r in services.rentals(s, user_id=user_id, open_only=open)]

    @app.get(f"{PREFIX}/users/{{user_id}}/sessions", response_model=list[SessionOut], tags=["user terminal"], summary="my outlet sessions")
    def my_sessions(user_id: str):
        with transaction(session_factory) as s:
            services.user(s, user_id)
            return [services.session_dict(x) for x in services.sessions(s, user_id=user_id)]

    @app.get(f"{PREFIX}/users/{{user_id}}/permits", response_model=list[PermitOut], tags=["user terminal"], summary="my permits")
    def my_permits(user_id: str, live: bool = False):
        with transaction(session_factory) as s:
            services.user(s, user_id)
            return [services.permit_dict(p) for p in services.list_permits(s, user_id=user_id, live_at=clock() if live else None)]

    @app.get(f"{PREFIX}/users/{{user_id}}/ledger", response_model=list[EntryOut], tags=["user terminal"], summary="my ledger entries")
    def my_ledger(user_id: str, limit: int = Query(100, ge=1, le=10000)):
        with transaction(session_factory) as s:
            services.user(s, user_id)
            return [services.entry_dict(e) for e in services.ledger(s, user_id=user_id, limit=limit)]

    # -------------------------------------------------------- operators

    @app.get(f"{PREFIX}/devices", response_model=list[DeviceOut], tags=["operator"], summary="the registry's boards")
    def list_devices():
        with transaction(session_factory) as s:
            return [services.device_dict(d) for d in services.devices(s)]

    @app.get(
        f"{PREFIX}/devices/{{device_id}}", response_model=DeviceDetail, tags=["operator"], summary="one board with its slots or outlets"
    )
    def get_device(device_id: str):
        with transaction(session_factory) as s:
            d = services.device(s, device_id)
            out = services.device_dict(d)
            out["slots"] = [services.slot_dict(x) for x in services.slots(s, device_id)]
            out["outlets"] = [services.outlet_dict(x) for x in services.outlets(s, device_id)]
            return out

    @app.get(f"{PREFIX}/batteries", response_model=list[BatteryOut], tags=["operator"], summary="batteries: where they are, their health")
    def list_batteries():
        with transaction(session_factory) as s:
            return [services.battery_dict(b) for b in services.batteries(s)]

    @app.get(f"{PREFIX}/batteries/{{battery_id}}", response_model=BatteryOut, tags=["operator"], summary="one battery")
    def get_battery(battery_id: str):
        with transaction(session_factory) as s:
            return services.battery_dict(services.battery(s, battery_id))

    @app.get(f"{PREFIX}/slots", response_model=list[SlotOut], tags=["operator"], summary="station slots as last reported")
    def list_slots(device: str | None = None):
        with transaction(session_factory) as s:
            return [services.slot_dict(x) for x in services.slots(s, device)]

    @app.get(f"{PREFIX}/outlets", response_model=list[OutletOut], tags=["operator"], summary="outlet relays as last reported")
    def list_outlets(device: str | None = None):
        with transaction(session_factory) as s:
            return [services.outlet_dict(x) for x in services.outlets(s, device)]

    @app.get(f"{PREFIX}/rentals", response_model=list[RentalOut], tags=["operator"], summary="rentals")
    def list_rentals(open: bool = False, flagged: bool | None = None, user: str | None = None, battery: str | None = None):
        with transaction(session_factory) as s:
            return [services.rental_dict(r) for r in services.rentals(s, user_id=user, battery_id=battery, open_only=open, flagged=flagged)]

    @app.get(f"{PREFIX}/alarms", response_model=list[RecordOut], tags=["operator"], summary="LOG_ALARM records")
    def alarms(
        device: str | None = None,
        since: int | None = Query(None, ge=0, le=2**63 - 1),
        until: int | None = Query(None, ge=0, le=2**63 - 1),
        limit: int = Query(1000, ge=1, le=100000),
    ):
        with transaction(session_factory) as s:
            if device is not None:
                services.device(s, device)
            return services.readings(s, device_id=device, types=[wire.LOG_ALARM], start=since, end=until, limit=limit)

    @app.get(f"{PREFIX}/readings", tags=["operator"], summary="readings and events as pulled, as JSON or CSV",
             responses={200: {"content": {"application/json": {}, "text/csv": {}}}})  # fmt: skip
    def get_readings(
        device: str | None = None,
        index: int | None = Query(None, ge=0, le=2**31 - 1, description="slot or outlet"),
        battery: str | None = Query(None, pattern=_HEX),
        type: list[str] | None = Query(None, description="record types: numbers or names (slot_reading, alarm, battery_out ...)"),
        since: int | None = Query(None, ge=0, le=2**63 - 1),
        until: int | None = Query(None, ge=0, le=2**63 - 1),
        limit: int = Query(1000, ge=1, le=100000),
        format: Literal["json", "csv"] = "json",
    ):
        with transaction(session_factory) as s:
            if device is not None:
                services.device(s, device)
            rows = services.readings(
                s, device_id=device, index=index, battery_id=battery, types=_types(type), start=since, end=until, limit=limit
            )
        if format == "csv":
            return Response(
                services.readings_csv(rows), media_type="text/csv", headers={"content-disposition": 'attachment; filename="readings.csv"'}
            )
        return rows

    @app.post(f"{PREFIX}/permits/{{cti}}/revoke", response_model=Revoked, tags=["operator"], summary="revoke a permit")
    def revoke_permit(cti: str):
        """The revocation is queued for the permit's board (sent at its next pull)."""

        def work(s):
            cmd = services.revoke_permit(s, cti, now=clock())
            return {"status": "revoked", "commands": [services.command_dict(cmd)] if cmd is not None else []}

        return tx(work)

    @app.post(
        f"{PREFIX}/users/{{user_id}}/revoke", response_model=Revoked, tags=["operator"], summary="suspend a user and revoke their permits"
    )
    def revoke_user(user_id: str, body: RevokeUser | None = None):
        status = body.status if body is not None else "suspended"

        def work(s):
            cmds = services.revoke_user(s, user_id, now=clock(), status=status)
            return {"status": status, "commands": [services.command_dict(c) for c in cmds]}

        return tx(work)

    @app.post(
        f"{PREFIX}/energy",
        status_code=201,
        response_model=EntryOut,
        tags=["operator"],
        summary="book an energy flow reported with a user id",
    )
    def energy(body: EnergyReport):
        """Energy taken is charged at the tariff; energy given back earns points (seed 001)."""

        def work(s):
            e = services.record_energy(
                s,
                user_id=body.user_id,
                device_id=body.device_id,
                direction=body.direction,
                energy_mwh=body.energy_mwh,
                start=body.start,
                end=body.end,
                ref=body.ref,
            )
            return services.entry_dict(e)

        return tx(work)

    @app.get(
        f"{PREFIX}/ledger/verify", response_model=LedgerCheckOut, tags=["operator"], summary="check the ledger's hash chain and balances"
    )
    def ledger_verify():
        with transaction(session_factory) as s:
            check = services.ledger_verify(s)
        c = check.chain
        return {
            "ok": check.ok,
            "entries": c.entries,
            "head_seq": c.head_seq,
            "head_hash": c.head_hash.hex(),
            "problem": None if c.problem is None else {"seq": c.problem.seq, "code": c.problem.code, "message": c.problem.message},
            "mismatches": check.mismatches,
        }

    return app
