"""A side-by-side against the peer (ansible-rulebook): `make peer-bench`. Not part of `make test`."""
