"""Infrastructure every layer above `config` shares: running programs, git, redaction, traceback parsing and the
client of mendloop's own API. Nothing here knows about runs, playbooks or work orders."""
