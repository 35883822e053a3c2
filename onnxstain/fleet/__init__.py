"""A copy for every customer: issue stained copies into a registry, name the customer of a copy, sign what ships.

The fleet's stable API::

    from onnxstain.fleet import Registry, identify, issue
    with Registry.open("fleet.db", create=True) as reg:
        issue("model.onnx", ["acme", "globex"], "dist/", reg)   # dist/acme.onnx, dist/globex.onnx
        print(identify("suspect.onnx", reg).named)

``issue_parallel`` issues with several workers (Ray or local processes); ``generate_key_pair`` makes the P-256 pair
that ``issue(..., signing_key=)`` signs with and ``identify(..., signer_key=)`` checks.
"""

from .identify import IdentifyResult, Match, identify
from .issue import IssuedCopy, IssueResult, issue, read_customers
from .registry import AlreadyIssuedError, CopyRecord, RecoveryReport, Registry
from .signing import generate_key_pair
from .workers import issue_parallel

__all__ = [
    "AlreadyIssuedError",
    "CopyRecord",
    "IdentifyResult",
    "IssueResult",
    "IssuedCopy",
    "Match",
    "RecoveryReport",
    "Registry",
    "generate_key_pair",
    "identify",
    "issue",
    "issue_parallel",
    "read_customers",
]
