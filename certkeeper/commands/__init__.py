"""One module per subcommand: ``main(config, args, out) -> exit code``.

Each module imports the domain code it drives inside ``main``, so ``cli`` can
import every command by name and start-up still loads only what the chosen
subcommand needs.
"""
