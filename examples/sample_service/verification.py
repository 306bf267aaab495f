"""Post-ingestion verification: every stored document must be complete and intact."""

from __future__ import annotations

import hashlib


def content_checksum(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def verify_document(doc: dict) -> list[str]:
    """Problems found in one stored document; empty when it verifies."""
    problems: list[str] = []
    if not doc.get("id"):
        problems.append("id missing")
    if not doc.get("page_count"):
        problems.append("page_count missing")
    elif not isinstance(doc["page_count"], int) or doc["page_count"] < 0:
        problems.append("page_count invalid")
    if doc.get("checksum") != content_checksum(doc.get("content", "")):
        problems.append("checksum mismatch")
    return problems


def verify_documents(documents: dict) -> list[dict]:
    """Verify all documents; one {"document_id", "problem"} entry per problem found."""
    failures: list[dict] = []
    for doc_id, doc in documents.items():
        for problem in verify_document(doc):
            failures.append({"document_id": doc_id, "problem": problem})
    return failures
