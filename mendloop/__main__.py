from mendloop.cli import main

main()
