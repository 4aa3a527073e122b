from sinkscope.bench import main

main()
