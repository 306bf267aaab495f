"""/tokens: the API tokens kept in the database (admin only, see domain/roles.py); the same as `mendloop tokens`."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from mendloop.api import views
from mendloop.api.deps import AppDep
from mendloop.api.responses import TokenCreated, TokenList, TokenOut
from mendloop.api.schemas import ERROR_RESPONSES, TokenCreate
from mendloop.storage.tokens import TokenRow

router = APIRouter(prefix="/tokens", tags=["tokens"], responses=ERROR_RESPONSES)


def token_out(row: TokenRow) -> TokenOut:
    return TokenOut(
        id=row.id,
        name=row.name,
        role=row.role.value,
        repositories=list(row.repositories),
        created_at=views.iso(row.created_at),
        revoked_at=views.iso(row.revoked_at),
    )


@router.get("")
async def list_tokens(app: AppDep) -> TokenList:
    rows = await run_in_threadpool(app.tokens.rows)
    return TokenList(tokens=[token_out(r) for r in rows], count=len(rows))


@router.post("", status_code=201)
async def create_token(app: AppDep, body: TokenCreate) -> TokenCreated:
    """A new token; the answer carries it, the only time it is shown."""
    row, secret = await run_in_threadpool(app.tokens.create, body.name, body.role, body.repositories)
    app.keyring.invalidate()
    return TokenCreated(**token_out(row).model_dump(), token=secret)


@router.delete("/{token_id}")
async def revoke_token(app: AppDep, token_id: str) -> TokenOut:
    """Revoke a token by its id (or its name); it is refused from the next request on."""
    row = await run_in_threadpool(app.tokens.revoke, token_id)
    app.keyring.invalidate()
    return token_out(row)
