module yamuxpeer

go 1.19

require github.com/hashicorp/yamux v0.0.0

// Built offline from Debian's golang-github-hashicorp-yamux-dev (snapshot df201c7, 2019).
replace github.com/hashicorp/yamux => /usr/share/gocode/src/github.com/hashicorp/yamux
