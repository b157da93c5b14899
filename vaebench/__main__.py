from vaebench.cli import entry

entry()
