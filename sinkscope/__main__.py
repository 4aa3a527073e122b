from sinkscope.cli import main

main()
