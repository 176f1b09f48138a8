// yamuxpeer is a hashicorp/yamux peer for visiona_tunnel's interop tests
// (tests/interop/test_go_yamux.py). It is built offline against Debian's
// golang-github-hashicorp-yamux-dev, the 2019 snapshot df201c7.
//
// Transport: one TCP connection, made with -connect HOST:PORT, or accepted on
// -listen ADDR (it then prints "LISTENING <port>" on stdout). The yamux role
// (-role client|server) is independent of who dials.
//
// Streams the Python side opens start with one command line:
//
//	echo                 echo bytes until EOF, then Close
//	send N [OFF]         write pattern(OFF, N) in ONE Write (frames as big as the window), then Close
//	sink                 read until EOF, write the sha256 hex digest and "\n", then Close
//	goaway               send GoAway(0), write "goaway sent\n", then behave as echo
//	open-after-goaway    read a line "go" (the Python side has called go_away() by then),
//	                     try to open a stream, expect that to fail or be reset, write
//	                     "ok remote-goaway\n" or "ok reset\n", then Close
//	close-first N M      write pattern(0, N), Close (FIN) first, then expect pattern(0, M)
//	                     from the peer; prints "DONE close-first" on stdout
//
// pattern(OFF, N) is byte i = ((i + OFF) * 7) mod 251.
//
// Scenarios (-scenario) add what the Go side does on its own; all but no-accept
// also serve the commands above:
//
//	serve            nothing more
//	no-accept        never call AcceptStream (backlog tests)
//	open-echo        open -streams K streams, send pattern(k, -size) on stream k while
//	                 reading it back byte-exact, then Close; prints "DONE open-echo"
//	ping             Ping the Python side 5 times; prints "DONE ping"
//	open-unaccepted  open -streams K streams and write to each; the Python side (with
//	                 accept_backlog = -peer-backlog, never accepting) must RST exactly
//	                 the streams beyond its backlog; prints "DONE open-unaccepted"
//
// The Python side always ends the session. The exit code is 0 only if every
// check passed; failures exit 1 at once with a "yamuxpeer: FAIL" line on stderr.
package main

import (
	"bufio"
	"crypto/sha256"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

var (
	listenAddr  = flag.String("listen", "", "accept one TCP connection on this address")
	connectAddr = flag.String("connect", "", "dial this TCP address")
	role        = flag.String("role", "server", "yamux role: client (odd ids) or server (even ids)")
	window      = flag.Uint("window", 256*1024, "MaxStreamWindowSize")
	backlog     = flag.Int("backlog", 256, "AcceptBacklog")
	scenario    = flag.String("scenario", "serve", "serve|no-accept|open-echo|ping|open-unaccepted")
	numStreams  = flag.Int("streams", 1, "streams to open (open-echo, open-unaccepted)")
	size        = flag.Int("size", 1<<20, "bytes per stream (open-echo)")
	peerBacklog = flag.Int("peer-backlog", 0, "the Python side's accept_backlog (open-unaccepted)")
	timeout     = flag.Duration("timeout", 60*time.Second, "give up (exit 1) after this long")
)

func logf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "yamuxpeer: "+format+"\n", args...)
}

func fail(format string, args ...interface{}) {
	logf("FAIL: "+format, args...)
	os.Exit(1)
}

// done tells the Python side (on stdout) that a Go-side check has passed.
func done(what string) { fmt.Printf("DONE %s\n", what) }

func pattern(off, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte((i + off) * 7 % 251)
	}
	return b
}

func main() {
	flag.Parse()
	time.AfterFunc(*timeout, func() { fail("timed out after %v", *timeout) })

	conn := dial()
	cfg := yamux.DefaultConfig()
	cfg.AcceptBacklog = *backlog
	cfg.MaxStreamWindowSize = uint32(*window)
	cfg.LogOutput = os.Stderr
	newSession := yamux.Server
	if *role == "client" {
		newSession = yamux.Client
	} else if *role != "server" {
		fail("bad -role %q", *role)
	}
	sess, err := newSession(conn, cfg)
	if err != nil {
		fail("yamux setup: %v", err)
	}

	var handlers sync.WaitGroup
	acceptDone := make(chan struct{})
	if *scenario == "no-accept" {
		close(acceptDone)
	} else {
		go func() {
			defer close(acceptDone)
			for {
				st, err := sess.AcceptStream()
				if err != nil {
					return // the session is over
				}
				handlers.Add(1)
				go func() {
					defer handlers.Done()
					handle(sess, st)
				}()
			}
		}()
	}

	scenarioDone := make(chan struct{})
	go func() {
		switch *scenario {
		case "serve", "no-accept":
			close(scenarioDone)
			return
		case "open-echo":
			openEcho(sess)
		case "ping":
			for i := 0; i < 5; i++ {
				rtt, err := sess.Ping()
				if err != nil {
					fail("ping %d: %v", i, err)
				}
				logf("ping %d: rtt %v", i, rtt)
			}
		case "open-unaccepted":
			openUnaccepted(sess)
		default:
			fail("unknown -scenario %q", *scenario)
		}
		close(scenarioDone) // before done(): the Python side closes the session on "DONE"
		done(*scenario)
	}()

	<-sess.CloseChan()
	select {
	case <-scenarioDone:
	default:
		fail("session closed before scenario %q finished", *scenario)
	}
	<-acceptDone
	handlers.Wait()
	logf("session closed, all checks passed")
}

func dial() net.Conn {
	switch {
	case *connectAddr != "":
		conn, err := net.Dial("tcp", *connectAddr)
		if err != nil {
			fail("dial: %v", err)
		}
		return conn
	case *listenAddr != "":
		ln, err := net.Listen("tcp", *listenAddr)
		if err != nil {
			fail("listen: %v", err)
		}
		fmt.Printf("LISTENING %d\n", ln.Addr().(*net.TCPAddr).Port)
		conn, err := ln.Accept()
		if err != nil {
			fail("accept: %v", err)
		}
		ln.Close()
		return conn
	}
	fail("need -listen or -connect")
	return nil
}

// handle serves one stream the Python side opened.
func handle(sess *yamux.Session, st *yamux.Stream) {
	id := st.StreamID()
	br := bufio.NewReaderSize(st, 64*1024)
	line, err := br.ReadString('\n')
	if err != nil {
		fail("stream %d: reading command: %v", id, err)
	}
	args := strings.Fields(line)
	if len(args) == 0 {
		fail("stream %d: empty command", id)
	}
	intArg := func(i int) int {
		if len(args) <= i {
			return 0
		}
		n, err := strconv.Atoi(args[i])
		if err != nil {
			fail("stream %d: bad number in %q", id, line)
		}
		return n
	}
	switch args[0] {
	case "echo":
		echo(st, br)
	case "send":
		mustWrite(st, pattern(intArg(2), intArg(1)))
		st.Close()
	case "sink":
		h := sha256.New()
		if _, err := io.Copy(h, br); err != nil {
			fail("stream %d: sink: %v", id, err)
		}
		mustWrite(st, []byte(fmt.Sprintf("%x\n", h.Sum(nil))))
		st.Close()
	case "goaway":
		if err := sess.GoAway(); err != nil {
			fail("GoAway: %v", err)
		}
		mustWrite(st, []byte("goaway sent\n"))
		echo(st, br)
	case "open-after-goaway":
		if l, err := br.ReadString('\n'); err != nil || l != "go\n" {
			fail("stream %d: want \"go\\n\", got %q, %v", id, l, err)
		}
		mustWrite(st, []byte("ok "+openAfterGoAway(sess)+"\n"))
		st.Close()
	case "close-first":
		n, m := intArg(1), intArg(2)
		mustWrite(st, pattern(0, n))
		st.Close()
		readAfterClose(br, id, m)
		done("close-first")
	default:
		fail("stream %d: unknown command %q", id, line)
	}
}

func mustWrite(st *yamux.Stream, b []byte) {
	if _, err := st.Write(b); err != nil {
		fail("stream %d: write: %v", st.StreamID(), err)
	}
}

// echo copies r back to st until EOF, then closes our side. In df201c7 a
// stream cannot be read after its own Close(), so echo never closes first.
func echo(st *yamux.Stream, r io.Reader) {
	buf := make([]byte, 64*1024)
	for {
		n, err := r.Read(buf)
		mustWrite(st, buf[:n])
		if err == io.EOF {
			st.Close()
			return
		}
		if err != nil {
			fail("stream %d: echo read: %v", st.StreamID(), err)
		}
	}
}

// readAfterClose reads exactly m bytes of pattern(0, m) after our own Close().
// df201c7's Read returns io.EOF at once after a local Close() when nothing is
// buffered, instead of waiting for the peer's data (fixed upstream in
// hashicorp/yamux#131). So here, and only here, EOF means "nothing yet" and we
// poll.
func readAfterClose(r io.Reader, id uint32, m int) {
	got := make([]byte, 0, m)
	buf := make([]byte, 64*1024)
	deadline := time.Now().Add(10 * time.Second)
	for len(got) < m {
		n, err := r.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil && err != io.EOF {
			fail("stream %d: read after close: %v", id, err)
		}
		if n == 0 {
			if time.Now().After(deadline) {
				fail("stream %d: got %d of %d bytes after our FIN", id, len(got), m)
			}
			time.Sleep(time.Millisecond)
		}
	}
	if string(got) != string(pattern(0, m)) {
		fail("stream %d: wrong bytes after our FIN", id)
	}
}

// openAfterGoAway opens a stream after the peer sent GoAway(0). That must fail
// (if the GoAway arrived first) or the peer must answer our SYN with RST.
func openAfterGoAway(sess *yamux.Session) string {
	st, err := sess.OpenStream()
	if err == yamux.ErrRemoteGoAway {
		return "remote-goaway"
	}
	if err != nil {
		fail("OpenStream after GoAway: unexpected error %v", err)
	}
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := st.Read(make([]byte, 1)); err != yamux.ErrConnectionReset {
		fail("stream %d opened after GoAway: want reset, read gave %v", st.StreamID(), err)
	}
	return "reset"
}

// openEcho opens K streams and checks that each comes back byte-exact.
func openEcho(sess *yamux.Session) {
	var wg sync.WaitGroup
	for k := 0; k < *numStreams; k++ {
		st, err := sess.OpenStream()
		if err != nil {
			fail("OpenStream %d: %v", k, err)
		}
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			want := pattern(k, *size)
			written := make(chan struct{})
			go func() {
				mustWrite(st, want)
				close(written)
			}()
			got := make([]byte, len(want))
			if _, err := io.ReadFull(st, got); err != nil {
				fail("stream %d: reading echo: %v", st.StreamID(), err)
			}
			if string(got) != string(want) {
				fail("stream %d: echo differs", st.StreamID())
			}
			<-written
			// No reads after this: df201c7 cannot read after its own Close().
			st.Close()
		}(k)
	}
	wg.Wait()
}

// openUnaccepted opens K streams on a peer that never accepts: exactly those
// beyond its backlog must be reset.
func openUnaccepted(sess *yamux.Session) {
	streams := make([]*yamux.Stream, *numStreams)
	for k := range streams {
		st, err := sess.OpenStream()
		if err != nil {
			fail("OpenStream %d: %v", k, err)
		}
		_, err = st.Write([]byte("x"))
		// An excess stream may already have been reset; a queued one must take the write.
		if err != nil && (k < *peerBacklog || err != yamux.ErrConnectionReset) {
			fail("stream %d (#%d): write: %v", st.StreamID(), k, err)
		}
		streams[k] = st
	}
	for k := *peerBacklog; k < len(streams); k++ {
		streams[k].SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := streams[k].Read(make([]byte, 1)); err != yamux.ErrConnectionReset {
			fail("stream %d (#%d) beyond the peer's backlog: want reset, read gave %v",
				streams[k].StreamID(), k, err)
		}
	}
	// The resets have arrived; the queued streams must not have been reset.
	for k := 0; k < *peerBacklog && k < len(streams); k++ {
		streams[k].SetReadDeadline(time.Now())
		if _, err := streams[k].Read(make([]byte, 1)); err != yamux.ErrTimeout {
			fail("stream %d (#%d) within the peer's backlog: want no data and no reset, read gave %v",
				streams[k].StreamID(), k, err)
		}
	}
}
