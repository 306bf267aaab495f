"""Tables, queries named by intent, migrations."""
