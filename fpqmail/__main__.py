from fpqmail.queue import main

main()
