"""The importer's CSV parsing: one payment a line, `month,payee,amount,currency`, amounts in the file's own format
("950.00", "1,200.50") turned into cents. Standard library only.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

LOG = logging.getLogger("importer.csv")

HEADER = ("month", "payee", "amount", "currency")
_MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")


@dataclass(frozen=True)
class Row:
    line: int
    month: str
    payee: str
    amount_cents: int
    currency: str


def split_fields(line: str) -> list[str]:
    """The fields of one CSV line."""
    return line.split(",")


def parse_amount(text: str, where: str) -> int:
    """`950.00`, `1,200.50` or `-12.5` → cents; thousands separators are allowed, more than 2 decimals are not."""
    cleaned = text.strip().replace(",", "")
    if not re.fullmatch(r"-?\d+(\.\d{1,2})?", cleaned):
        raise ValueError(f"{where}: amount {text!r} is not a number")
    whole, _, fraction = cleaned.lstrip("-").partition(".")
    cents = int(whole) * 100 + int((fraction + "00")[:2])
    return -cents if cleaned.startswith("-") else cents


def parse_rows(name: str, text: str) -> list[Row]:
    """Every payment of the file `name` whose content is `text`. Raises ValueError naming the file and line."""
    lines = text.splitlines()
    if not lines or tuple(f.strip() for f in split_fields(lines[0])) != HEADER:
        raise ValueError(f"{name}, line 1: the header must be {','.join(HEADER)}")
    rows: list[Row] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"{name}, line {number}"
        fields = [f.strip() for f in split_fields(line)]
        if len(fields) != len(HEADER):
            raise ValueError(
                f"{where}: expected {len(HEADER)} fields ({','.join(HEADER)}), got {len(fields)}: {line!r}"
            )
        month, payee, amount, currency = fields
        if not _MONTH.match(month):
            raise ValueError(f"{where}: month {month!r} is not YYYY-MM")
        if not _CURRENCY.match(currency):
            raise ValueError(f"{where}: currency {currency!r} is not a 3-letter code")
        rows.append(Row(number, month, payee, parse_amount(amount, where), currency))
    return rows
