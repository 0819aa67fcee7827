"""``python -m pacore``: the same as the ``pacore`` command."""

from pacore.cli.main import main

main()
