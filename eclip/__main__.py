from eclip.cli import main

main()
