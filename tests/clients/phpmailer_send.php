<?php
// Send mails the way Moodle does: PHPMailer over SMTP, AUTH LOGIN, Nagle on.
//
//   php phpmailer_send.php < job.json
//
// job: {"host": "127.0.0.1", "port": 2525, "user": "moodle" | null, "pass": "...",
//       "secure": "" | "tls" | "ssl", "keepalive": false,
//       "mails": [{"from": ..., "from_name": ..., "to": ..., "to_name": ..., "subject": ...,
//                  "body": ..., "html": null | "...", "message_id": null | "<...>",
//                  "headers": [["X-Name", "value"], ...]}]}
// keepalive false: one connection per mail (Moodle's default); true: one connection,
// RSET between mails (Moodle's smtpmaxbulk).
//
// Output, one JSON line per mail: {"ok": bool, "queue_id": from the DATA reply, "reply": last
// SMTP reply, "error": ..., "mime": base64 of getSentMIMEMessage(), "seconds": time in send()}.
// PHPMailer is Debian's libphp-phpmailer unless $PHPMAILER_AUTOLOAD says otherwise.

require getenv('PHPMAILER_AUTOLOAD') ?: '/usr/share/php/libphp-phpmailer/autoload.php';

use PHPMailer\PHPMailer\PHPMailer;
use PHPMailer\PHPMailer\Exception;

$job = json_decode(stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);

$mailer = new PHPMailer(true);
$mailer->isSMTP();
$mailer->Host = $job['host'];
$mailer->Port = $job['port'];
$mailer->Hostname = 'moodle.test';
$mailer->CharSet = 'UTF-8';
$mailer->Timeout = 10;
$mailer->SMTPAutoTLS = false;  // Moodle: no opportunistic STARTTLS
$mailer->SMTPSecure = $job['secure'] ?? '';
$mailer->SMTPOptions = ['ssl' => ['verify_peer' => false, 'verify_peer_name' => false,
                                  'allow_self_signed' => true]];
$mailer->SMTPKeepAlive = (bool)($job['keepalive'] ?? false);
if (!empty($job['user'])) {
    $mailer->SMTPAuth = true;
    $mailer->AuthType = 'LOGIN';  // Moodle's default
    $mailer->Username = $job['user'];
    $mailer->Password = $job['pass'];
}

foreach ($job['mails'] as $m) {
    $mailer->clearAllRecipients();
    $mailer->clearCustomHeaders();
    $mailer->clearReplyTos();
    $mailer->setFrom($m['from'], $m['from_name'] ?? '', false);
    $mailer->addAddress($m['to'], $m['to_name'] ?? '');
    $mailer->Subject = $m['subject'];
    $mailer->MessageID = $m['message_id'] ?? '';
    foreach ($m['headers'] ?? [] as [$name, $value]) {
        $mailer->addCustomHeader($name, $value);
    }
    if (!empty($m['html'])) {
        $mailer->isHTML(true);
        $mailer->Body = $m['html'];
        $mailer->AltBody = $m['body'];
    } else {
        $mailer->isHTML(false);
        $mailer->Body = $m['body'];
        $mailer->AltBody = '';
    }
    $result = ['ok' => false, 'reply' => '', 'error' => null];
    $started = hrtime(true);
    try {
        $result['ok'] = $mailer->send();
    } catch (Exception $e) {
        $result['error'] = $mailer->ErrorInfo;
    }
    $result['seconds'] = (hrtime(true) - $started) / 1e9;
    $smtp = $mailer->getSMTPInstance();
    $result['reply'] = trim($smtp->getLastReply());
    // Parsed by PHPMailer from the DATA reply ("250 2.0.0 Ok: queued as ID", Postfix style).
    $result['queue_id'] = $result['ok'] ? $smtp->getLastTransactionID() : null;
    $result['mime'] = base64_encode($mailer->getSentMIMEMessage());
    echo json_encode($result), "\n";
    if (!$mailer->SMTPKeepAlive) {
        $mailer->smtpClose();
    }
}
$mailer->smtpClose();
