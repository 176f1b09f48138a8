module tunnelpeers

go 1.19

require (
	github.com/gorilla/websocket v1.5.0
	github.com/hashicorp/yamux v0.0.0
)

// Built offline from Debian's sources: golang-github-gorilla-websocket-dev (1.5.0) and
// golang-github-hashicorp-yamux-dev (snapshot df201c7, 2019).
replace github.com/gorilla/websocket => /usr/share/gocode/src/github.com/gorilla/websocket

replace github.com/hashicorp/yamux => /usr/share/gocode/src/github.com/hashicorp/yamux
