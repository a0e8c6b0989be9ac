from cryptlayer.cli import main

main()
