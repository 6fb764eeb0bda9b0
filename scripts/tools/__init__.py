"""The bundle's command-line tools, at the edge of the runtime in scripts/: each parses its flags once
(``scripts.tools.cli.run``) and imports the runtime; the runtime, which the configs call, imports none of them."""
