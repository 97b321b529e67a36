from guidealign.cli import main

main()
