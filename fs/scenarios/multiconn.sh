# The same through four connections (nbd-client -C 4): the server's multi-conn promise at work.
. /scenarios/_lib.sh
host mark multiconn-start
exercise -b 4096 -C 4
host mark multiconn-end
