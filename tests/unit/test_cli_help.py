"""`posttrain --help`: the first session it shows parses, flag for flag, with the parser it documents."""

import shlex

from posttrain.cli import EPILOG, build_parser


def test_every_example_of_the_top_level_help_parses():
    """The examples name commands and flags; a flag renamed later would leave the help teaching a usage error."""
    lines = [line.split("#")[0].strip() for line in EPILOG.splitlines() if line.strip().startswith("posttrain ")]
    assert len(lines) == 6
    parser = build_parser()
    for line in lines:
        argv = shlex.split(line)[1:]
        args, extra = parser.parse_known_args(argv)
        assert extra == [] or (args.command == "train" and all("=" in a for a in extra)), line
        assert args.command == argv[0]
