from sagewatch.cli import main

main()
