"""What caused a failure, decided from mendloop's own evidence, then refined by the service's analysis if it has one.

The built-in hybrid and code-patch playbooks must work for a service that has no analysis endpoint of any kind, so
the first answer comes from what mendloop saw itself:

- a traceback whose frames lie inside the target's repository is a cause in the **code**: the innermost such frame
  is the suspect (the agent is pointed there);
- a timeout against a configured limit is a **config** cause: the limit is raised (by `factor`, capped), because
  nothing in the evidence says the work itself is wrong;
- a traceback only through code outside the repository (a library, the interpreter) is **unknown**: it is not the
  repository's to patch, and a playbook then verifies without changing anything, so a human sees it;
- no evidence at all is **unknown** too, never a guess.

An analysis capability, when the target binds one, knows the service better: its `cause` wins, its other outputs
are kept, and what the evidence said stays beside it so the timeline can show both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CODE, CONFIG, UNKNOWN = "code", "config", "unknown"
DEFAULT_TIMEOUT_FACTOR = 2.0


@dataclass(frozen=True, slots=True)
class Suspect:
    """A frame of the traceback inside the repository: `file` is relative to the repository's root."""

    file: str
    line: int | None
    function: str | None


@dataclass(frozen=True, slots=True)
class Evidence:
    """What mendloop itself knows of one failure."""

    repository_frames: Sequence[Suspect] = ()  # outermost first, as a traceback lists them
    other_frames: int = 0  # frames outside the repository
    exception: str | None = None  # `ValueError: could not convert ...`
    observed_seconds: float | None = None  # how long it ran before the timeout
    limit_seconds: float | None = None  # the configured limit it ran against


@dataclass(frozen=True, slots=True)
class Diagnosis:
    cause: str
    details: str
    source: str  # "evidence" or "analysis"
    suspect: Suspect | None = None
    recommended_timeout_seconds: float | None = None

    def outputs(self) -> dict[str, Any]:
        """The normalised outputs a playbook reads (`steps.<id>.outputs.<name>`)."""
        return {
            "cause": self.cause,
            "details": self.details,
            "source": self.source,
            "suspect_file": self.suspect.file if self.suspect else None,
            "suspect_line": self.suspect.line if self.suspect else None,
            "suspect_function": self.suspect.function if self.suspect else None,
            "recommended_timeout_seconds": self.recommended_timeout_seconds,
        }


def from_evidence(
    evidence: Evidence, *, factor: float = DEFAULT_TIMEOUT_FACTOR, max_timeout_seconds: float | None = None
) -> Diagnosis:
    """The cause by the rules in the module's docstring."""
    if evidence.repository_frames:
        suspect = evidence.repository_frames[-1]
        what = f" ({evidence.exception})" if evidence.exception else ""
        return Diagnosis(
            CODE,
            f"the traceback{what} runs through the repository; innermost there: {suspect.file}:{suspect.line} "
            f"in {suspect.function}",
            "evidence",
            suspect,
        )
    observed, limit = evidence.observed_seconds, evidence.limit_seconds
    if observed is not None or limit is not None:
        # A timeout message names the limit it hit ("timeout after 300 seconds"): it is the limit when none is set.
        limit = limit if limit is not None else observed
        assert limit is not None
        if observed is not None and observed < limit:
            return Diagnosis(
                UNKNOWN,
                f"timed out after {_seconds(observed)} s, under its configured limit of {_seconds(limit)} s: "
                "the limit is not what stopped it",
                "evidence",
            )
        raised = math.ceil(max(limit, 1.0) * max(factor, 1.0))
        if max_timeout_seconds is not None:
            raised = min(raised, math.floor(max_timeout_seconds))
        if raised <= limit:
            return Diagnosis(
                UNKNOWN,
                f"timed out against its configured limit of {_seconds(limit)} s, already at the most allowed "
                f"({_seconds(max_timeout_seconds or limit)} s)",
                "evidence",
            )
        return Diagnosis(
            CONFIG,
            f"timed out against its configured limit of {_seconds(limit)} s and no traceback points into the "
            f"code: raise the limit to {raised} s",
            "evidence",
            recommended_timeout_seconds=float(raised),
        )
    if evidence.other_frames:
        return Diagnosis(
            UNKNOWN,
            f"the traceback ({evidence.exception or 'an exception'}) runs only through code outside the "
            "repository: not the repository's to patch",
            "evidence",
        )
    return Diagnosis(UNKNOWN, "no traceback and no timeout limit in the evidence: nothing to decide from", "evidence")


def refine(found: Diagnosis, analysis: Mapping[str, Any] | None) -> tuple[Diagnosis, dict[str, Any]]:
    """`found` refined by an analysis capability's normalised outputs: its `cause` (any text it uses: `data`,
    `logic`, `none`...) wins when it names one. Returns the diagnosis and the outputs a playbook reads: the
    analysis's own outputs as it gave them, and the diagnosis's normalised ones where it gave none."""
    if not analysis or not isinstance(analysis.get("cause"), str) or not analysis["cause"].strip():
        outputs = {**dict(analysis or {}), **found.outputs()}
        return found, outputs
    details = analysis.get("details")
    suspect = found.suspect
    if isinstance(analysis.get("suspect_file"), str) and analysis["suspect_file"]:
        line = analysis.get("suspect_line")
        function = analysis.get("suspect_function")
        suspect = Suspect(
            analysis["suspect_file"],
            line if isinstance(line, int) and not isinstance(line, bool) else None,
            function if isinstance(function, str) else None,
        )
    recommended = analysis.get("recommended_timeout_seconds")
    refined = Diagnosis(
        cause=analysis["cause"].strip(),
        details=details if isinstance(details, str) and details else f"the service's analysis says {analysis['cause']}",
        source="analysis",
        suspect=suspect,
        recommended_timeout_seconds=(
            float(recommended)
            if isinstance(recommended, int | float) and not isinstance(recommended, bool)
            else found.recommended_timeout_seconds
        ),
    )
    # The analysis's own fields stay as it gave them (a `details` object, say); the normalised ones fill the rest.
    return refined, {**refined.outputs(), **dict(analysis)}


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
