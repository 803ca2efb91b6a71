<?php
// Moodle's own SMTP path, timed: PHPMailer (Debian libphp-phpmailer) sending
// re-engagement-like mails one SMTP connection per mail (smtpmaxbulk = 1,
// SMTPAutoTLS off, as Moodle's get_mailer() sets it up).
//
// usage: php phpmailer_latency.php HOST PORT COUNT
// prints one JSON object: {"count", "ok", "failed", "errors", "ms": [per-mail send() ms]}

require 'libphp-phpmailer/autoload.php';  // Debian: /usr/share/php is on include_path

use PHPMailer\PHPMailer\PHPMailer;

[$host, $port, $count] = [$argv[1], (int)$argv[2], (int)$argv[3]];
$site = 'moodle.example.org';
$text = "Dear Student 1,\n\nYou have not visited Biology 101 (BIO101) for a while.\n"
    . str_repeat("Please log in and continue where you left off in the course.\n", 12)
    . "\nBiology 101 - https://$site/course/view.php?id=42\n";
$html = '<div class="text_to_html">' . nl2br(htmlspecialchars($text)) . '</div>';

$times = [];
$errors = [];
$ok = 0;
for ($i = 0; $i < $count; $i++) {
    $mail = new PHPMailer(true);
    $mail->isSMTP();
    $mail->Host = $host;
    $mail->Port = $port;
    $mail->SMTPAuth = false;
    $mail->SMTPAutoTLS = false;
    $mail->SMTPKeepAlive = false;
    $mail->Hostname = $site;
    $mail->CharSet = 'UTF-8';
    $mail->Encoding = 'quoted-printable';
    $mail->Sender = "noreply@$site";
    $mail->setFrom("noreply@$site", 'Admin User (via Moodle Demo)', false);
    $mail->addReplyTo("noreply@$site", 'Do not reply to this email');
    $mail->addAddress("student$i@example.org", "Student $i");
    $mail->Subject = 'We miss you in BIO101 &amp; friends';
    $mail->MessageID = '<' . uniqid('', true) . "@$site>";
    $mail->addCustomHeader('X-Moodle-Originating-Script', "$site => $site:mod/reengagement/lib.php:565");
    $mail->isHTML(true);
    $mail->Body = $html;
    $mail->AltBody = $text;
    $start = hrtime(true);
    try {
        $mail->send();
        $ok++;
    } catch (Exception $e) {
        if (count($errors) < 5) {
            $errors[] = $mail->ErrorInfo;
        }
    }
    $times[] = (hrtime(true) - $start) / 1e6;
}
echo json_encode([
    'count' => $count,
    'ok' => $ok,
    'failed' => $count - $ok,
    'errors' => $errors,
    'phpmailer' => PHPMailer::VERSION,
    'ms' => $times,
]), "\n";
