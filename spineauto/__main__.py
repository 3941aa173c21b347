from spineauto.cli import main

main()
