from certkeeper.cli import entry

entry()
